"""abd-jax: Anti-Backdoor data-free knowledge distillation in JAX/Flax."""
