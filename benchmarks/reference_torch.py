"""Side-by-side reference timings (issue 7): the reference's ZSKT workload re-created in PyTorch.

    python -m benchmarks.reference_torch [--cases teacher_forward kd_step zskt zskt_sv zskt_sr [student_fwd_bwd]]
                                         [--threads 2] [--device cpu|cuda] [--repeats 5] [--json]

Why this exists: issue 7's reference figures were taken on this machine on an earlier day, and
the machine's speed drifts between days by up to 40% (docs/PERFORMANCE.md), so a ratio against
them says little. This script runs the same work as the reference's ZSKT solver, in PyTorch, so
that `benchmarks.suite` and it can be run back to back and compared on the same day.

It is written for this benchmark from the paper's description and the reference's structure, not
copied from the reference: same architectures (WRN-16-2 teacher, WRN-16-1 student, the ZSKT
generator), same batch (128 x 3 x 32 x 32, NCHW as PyTorch defaults to), same optimizers (Adam,
gradient clipping at 5) and, deliberately, the reference's order of work, including what our JAX
code removes: the reference's image loader runs G(z) again before every student step (with
autograd on, so each student backward also runs back through the generator), and the teacher's
outputs are recomputed every step. One pseudo-batch = 1 generator step + 10 student steps; with
`zskt_sv` the generator loss adds the Shuffling Vaccine penalty over an ensemble of 3 teacher
copies whose last 5 conv kernels have permuted input channels (gradients flow through them to
the generator, as in the reference's default). With `zskt_sr` every student step runs
Self-Retrospection at the released sweeps' settings (spec 4.1: 10 Adam rounds of trigger search on
the teacher, K = 5 fixed-point iterations, delta on 2% of the batch), with double backward through
the student for the hypergradient, as the reference does with autograd. One saving the reference
does not make, which favours PyTorch: the trigger search's clean logits are computed once per
student step, not in every round.

Needs PyTorch, which abd-jax does not depend on: install it in a separate environment
(`python -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install torch`) and run this module with that
interpreter from the repository root. Random weights (speed does not depend on them).
`--json` prints one JSON object per case with `median_ms`, `min_ms`, `max_ms`, like the suite.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_CASES = ("teacher_forward", "kd_step", "zskt", "zskt_sv", "zskt_sr")  # issue 7's table
CASES = (*DEFAULT_CASES, "student_fwd_bwd")


class Block(nn.Module):
    """Pre-activation WRN basic block; the 1x1 projection reads the activated input."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cout)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False) if (cin != cout or stride != 1) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        return out + (self.conv_shortcut(act) if self.conv_shortcut is not None else x)


class WRN(nn.Module):
    """WRN-depth-k returning (logits, [stage outputs]) for attention transfer."""

    def __init__(self, depth: int, k: int, num_classes: int = 10) -> None:
        super().__init__()
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        stages, cin = [], 16
        for width, stride in ((16 * k, 1), (32 * k, 2), (64 * k, 2)):
            stages.append(nn.Sequential(*[Block(cin if i == 0 else width, width, stride if i == 0 else 1)
                                          for i in range(n)]))
            cin = width
        self.stages = nn.ModuleList(stages)
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out, feats = self.conv1(x), []
        for stage in self.stages:
            out = stage(out)
            feats.append(out)
        out = F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1).flatten(1)
        return self.fc(out), feats


def generator(z_dim: int = 100) -> nn.Module:
    """The ZSKT generator for 32x32 images (spec 6.1)."""
    return nn.Sequential(
        nn.Linear(z_dim, 128 * 8 * 8), nn.Unflatten(1, (128, 8, 8)), nn.BatchNorm2d(128),
        nn.Upsample(scale_factor=2), nn.Conv2d(128, 128, 3, 1, 1), nn.BatchNorm2d(128), nn.LeakyReLU(0.2),
        nn.Upsample(scale_factor=2), nn.Conv2d(128, 64, 3, 1, 1), nn.BatchNorm2d(64), nn.LeakyReLU(0.2),
        nn.Conv2d(64, 3, 3, 1, 1), nn.BatchNorm2d(3, affine=True),
    )


def shuffled_copy(model: nn.Module, n_layers: int = 5) -> nn.Module:
    """A copy whose last `n_layers` conv kernels have their input channels permuted (spec 3.1)."""
    model = copy.deepcopy(model)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        for conv in convs[len(convs) - n_layers:]:
            conv.weight.copy_(conv.weight[:, torch.randperm(conv.weight.shape[1])])
    return model


def kl_mean(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_T || p_S), averaged over batch and classes (the ZSKT recipe's reduction, written out:
    PyTorch warns that `reduction="mean"` will change meaning)."""
    kl = F.kl_div(F.log_softmax(student_logits, 1), F.softmax(teacher_logits, 1), reduction="sum")
    return kl / student_logits.numel()


def attention(f: torch.Tensor) -> torch.Tensor:
    return F.normalize(f.pow(2).mean(1).flatten(1))


def student_loss(s_logits, s_feats, t_logits, t_feats, beta: float = 250.0) -> torch.Tensor:
    at = sum((attention(s) - attention(t)).pow(2).mean() for s, t in zip(s_feats, t_feats))
    return kl_mean(s_logits, t_logits) + beta * at


def sv_penalty(shuffled: list[nn.Module], t_logits: torch.Tensor, x: torch.Tensor, coef: float = 0.1) -> torch.Tensor:
    """The vaccine's generator term: -coef * mean KL(teacher || shuffled) over flagged samples."""
    sh_logits = torch.stack([m(x)[0] for m in shuffled]).mean(0)
    mask = sh_logits.argmax(1).eq(t_logits.argmax(1)).float()
    if mask.sum() == 0:
        return torch.zeros((), device=x.device)
    per_sample = F.kl_div(F.log_softmax(sh_logits, 1), F.softmax(t_logits, 1), reduction="none").mean(1)
    return -coef * (per_sample * mask).sum() / mask.sum()


class Workload:
    """Teacher, student, generator and their optimizers, wired as the reference's solver is."""

    def __init__(self, batch: int, sv: bool, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.teacher = WRN(16, 2).to(self.device).eval()
        self.student, self.gen = WRN(16, 1).to(self.device).train(), generator().to(self.device).train()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.shuffled = [shuffled_copy(self.teacher).eval() for _ in range(3)] if sv else []
        self.opt_s = torch.optim.Adam(self.student.parameters(), lr=2e-3)
        self.opt_g = torch.optim.Adam(self.gen.parameters(), lr=1e-3)
        self.batch = batch
        self.x = torch.randn(batch, 3, 32, 32, device=self.device)

    def generator_step(self, z: torch.Tensor) -> None:
        x = self.gen(z)
        s_logits, _ = self.student(x)
        t_logits, _ = self.teacher(x)
        loss = -kl_mean(s_logits, t_logits)
        if self.shuffled:
            loss = loss + sv_penalty(self.shuffled, t_logits, x)
        self.opt_g.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(self.gen.parameters(), 5)
        self.opt_g.step()

    def student_step(self, x: torch.Tensor) -> None:
        with torch.no_grad():
            t_logits, t_feats = self.teacher(x)
        s_logits, s_feats = self.student(x)
        loss = student_loss(s_logits, s_feats, t_logits, t_feats)
        self.opt_s.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(self.student.parameters(), 5)
        self.opt_s.step()

    def sr_student_step(self, x: torch.Tensor, rounds: int = 10, fp_iterations: int = 5) -> None:
        """A student step with Self-Retrospection (spec 4.1, the sweeps' settings): R Adam rounds
        (lr 0.1) of trigger search on the teacher, the fixed-point hypergradient (K iterations of
        Phi = delta - 0.1 grad_delta L_in) of the outer KL on 2% of the batch written into the
        student's grads, the normal KD loss accumulated on top, one unclipped Adam step."""
        xd = x.detach()
        with torch.no_grad():
            t_clean = self.teacher(xd)[0]
        delta = torch.zeros(1, *xd.shape[1:], device=self.device, requires_grad=True)
        opt_d = torch.optim.Adam([delta], lr=0.1)
        for _ in range(rounds):
            loss = -kl_mean(self.teacher(xd + delta)[0], t_clean) + 1e-3 * delta.pow(2).sum()
            opt_d.zero_grad()
            loss.backward()
            opt_d.step()
        delta = delta.detach().requires_grad_(True)
        params = list(self.student.parameters())
        with torch.no_grad():
            s_clean = self.student(xd)[0]  # the clean side is detached in every KL below
        # Outer loss on x' (delta on 2% of the samples) and its two partial gradients.
        mask = torch.zeros(xd.shape[0], 1, 1, 1, device=self.device)
        mask[torch.randperm(xd.shape[0], device=self.device)[: max(int(0.02 * xd.shape[0]), 1)]] = 1.0
        outer = kl_mean(self.student(xd + mask * delta)[0], s_clean)
        g_outer = torch.autograd.grad(outer, [delta, *params], allow_unused=True)
        g_delta, g_params = g_outer[0], [g if g is not None else torch.zeros_like(p) for g, p in zip(g_outer[1:], params)]
        # Phi(delta, theta) with its graph kept, for the K vector-Jacobian products.
        inner = -kl_mean(self.student(xd + delta)[0], s_clean) + 1e-3 * delta.pow(2).sum()
        phi = delta - 0.1 * torch.autograd.grad(inner, delta, create_graph=True)[0]
        v = torch.zeros_like(delta)
        for _ in range(fp_iterations):
            v = torch.autograd.grad(phi, delta, grad_outputs=v, retain_graph=True)[0] + g_delta
        g_phi = torch.autograd.grad(phi, params, grad_outputs=v, allow_unused=True)
        self.opt_s.zero_grad()
        for p, go, gp in zip(params, g_params, g_phi):
            p.grad = go + (gp if gp is not None else 0.0)
        with torch.no_grad():
            t_logits, t_feats = self.teacher(x)
        s_logits, s_feats = self.student(x)
        student_loss(s_logits, s_feats, t_logits, t_feats).backward()  # accumulates onto the SR grads
        self.opt_s.step()

    def pseudo_batch(self, sr: bool = False) -> None:
        z = torch.randn(self.batch, 100, device=self.device)
        self.generator_step(z)
        for _ in range(10):
            x = self.gen(z)  # the reference's loader re-runs G(z), autograd on
            self.sr_student_step(x) if sr else self.student_step(x)

    def kd_step(self) -> None:
        self.student_step(self.x)

    def student_fwd_bwd(self) -> None:
        """Student forward + backward in train mode (as benchmarks.suite's `student_fwd_bwd`)."""
        self.student.zero_grad()
        self.student(self.x)[0].pow(2).mean().backward()

    def teacher_forward(self) -> None:
        with torch.no_grad():
            self.teacher(self.x)


def time_calls(fn: Callable[[], None], repeats: int, sync: Callable[[], None]) -> dict:
    t0 = time.perf_counter()
    fn()  # warm-up (oneDNN primitive creation, allocator, cuDNN autotuning)
    sync()
    first_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()  # CUDA runs asynchronously: wait for the work, not just its launch
        times.append(1000 * (time.perf_counter() - t0))
    return {"first_call_s": round(first_s, 2), "median_ms": round(statistics.median(times), 1),
            "min_ms": round(min(times), 1), "max_ms": round(max(times), 1)}


def run_case(case: str, batch: int, repeats: int, device: str = "cpu") -> dict:
    torch.manual_seed(0)
    work = Workload(batch, sv=case == "zskt_sv", device=device)
    fn = {"teacher_forward": work.teacher_forward, "kd_step": work.kd_step,
          "zskt": work.pseudo_batch, "zskt_sv": work.pseudo_batch,
          "zskt_sr": lambda: work.pseudo_batch(sr=True), "student_fwd_bwd": work.student_fwd_bwd}[case]
    sync = torch.cuda.synchronize if work.device.type == "cuda" else (lambda: None)
    row = {"case": case, "impl": "pytorch-reference-workload", "batch": batch, "device": str(work.device),
           **time_calls(fn, repeats, sync)}
    row.update(peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
               threads=torch.get_num_threads(), torch=torch.__version__)
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", choices=CASES, default=list(DEFAULT_CASES))
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (the issue's reference: 2)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda; the reference sets cudnn.benchmark")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True  # as the reference's main does (no effect on the CPU)
    rows = []
    for case in args.cases:
        row = run_case(case, args.batch, args.repeats, args.device)
        rows.append(row)
        print(json.dumps(row) if args.json else f"{case:16s} median {row['median_ms']:.1f} ms "
              f"(min {row['min_ms']:.1f}, max {row['max_ms']:.1f}; first call {row['first_call_s']} s)", flush=True)
    return rows


if __name__ == "__main__":
    main()
