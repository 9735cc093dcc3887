"""What every benchmark shares: interleaved timing, the four workloads, machine facts, results on disk.

Timing: all variants of one comparison run in one process, after warm-up, one call of each per
round in a rotating order, and the median over rounds is reported. Interleaving makes a change in
machine load (other processes, frequency) hit every variant alike instead of biasing whichever
happened to run during it.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import repguide as rg
from repguide import data, models

RESULTS = Path(__file__).resolve().parent / "results"

#: ``BENCH_CLOCK=cpu`` times with the calling thread's CPU time instead of wall time: other
#: processes' load does not inflate it, but it only counts work done on that thread, so it is
#: meaningful with one intra-op thread (``THREADS=1 BENCH_CLOCK=cpu bash benchmarks/run.sh``).
CLOCK_NAME = os.environ.get("BENCH_CLOCK", "wall")
CLOCK = {"wall": time.perf_counter, "cpu": time.thread_time}[CLOCK_NAME]

#: ``BENCH_DEVICE=cuda`` runs bench_step and bench_kernels on the current CUDA device: models,
#: batches and test matrices are moved there, every timed call is followed by
#: ``torch.cuda.synchronize()`` before the (wall) clock is read, peak memory is
#: ``torch.cuda.max_memory_allocated()``, and results go to their own files (``save``).
DEVICE_NAME = os.environ.get("BENCH_DEVICE", "cpu")
if DEVICE_NAME not in ("cpu", "cuda"):
    raise SystemExit(f"BENCH_DEVICE must be 'cpu' (the default) or 'cuda'; got {DEVICE_NAME!r}")
CUDA = DEVICE_NAME == "cuda"
if CUDA:
    if CLOCK_NAME != "wall":
        raise SystemExit(f"BENCH_CLOCK={CLOCK_NAME} counts host CPU time, which says nothing about GPU "
                         "work; use BENCH_CLOCK=wall (the default) with BENCH_DEVICE=cuda")
    if not torch.cuda.is_available():
        raise SystemExit("BENCH_DEVICE=cuda but torch.cuda.is_available() is False "
                         f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})")
DEVICE = torch.device(DEVICE_NAME)


def sync() -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if CUDA:
        torch.cuda.synchronize()


def require_cpu(name: str) -> None:
    """Stop a benchmark that has no CUDA path with a message that says so."""
    if CUDA:
        raise SystemExit(f"{name} runs on the CPU only; BENCH_DEVICE=cuda is supported by "
                         "bench_step and bench_kernels (bash benchmarks/gpu.sh)")


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2,
                clock: Callable[[], float] = CLOCK) -> dict[str, dict]:
    """``name → {"median", "q1", "q3", "min"}`` in seconds over ``repeats`` rounds.

    On CUDA every call is followed by ``torch.cuda.synchronize()`` inside its timed interval, so
    a time covers the GPU work the call queued, and no call's work spills into the next one's.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = clock()
            fns[name]()
            sync()
            times[name].append(clock() - t0)
    return {name: summary(ts) for name, ts in times.items()}


def summary(ts: list[float]) -> dict:
    q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
    return {"median": statistics.median(ts), "q1": q[0], "q3": q[2], "min": min(ts), "n": len(ts)}


def machine() -> dict:
    """Facts that a timing depends on."""
    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor())
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "clock": CLOCK_NAME,
        "malloc_env_set": bool(os.environ.get("MALLOC_MMAP_THRESHOLD_")) and bool(os.environ.get("MALLOC_TRIM_THRESHOLD_")),
        "loadavg_1min": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d %H:%M"),
        **(_cuda_facts() if CUDA else {}),
    }


def _cuda_facts() -> dict:
    props = torch.cuda.get_device_properties(DEVICE)
    return {
        "device": "cuda",
        "gpu": torch.cuda.get_device_name(DEVICE),
        "gpu_memory_gib": props.total_memory / 2**30,
        "gpu_capability": f"{props.major}.{props.minor}",
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        # What PyTorch may use for fp32 products: TF32 is off for matmul by default ("highest")
        # and on for cuDNN convolutions.
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "argv": " ".join(sys.argv),
    }


def gpu_slug() -> str:
    """The CUDA device's name as a file-name part: "NVIDIA H200" → "nvidia-h200"."""
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(DEVICE).lower()).strip("-")


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def check_environment() -> None:
    if not os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        print("warning: MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ are not set; run through "
              "benchmarks/run.sh (glibc malloc makes conv timings up to 2.3x slower and noisy)")
    if CLOCK_NAME == "cpu" and torch.get_num_threads() > 1:
        print("warning: BENCH_CLOCK=cpu counts the main thread only; use it with THREADS=1")


def save(name: str, payload: dict) -> Path:
    """results/<name>.json; runs with another thread count or clock get their own file, and CUDA
    runs results/<name>-cuda-<card>.json (e.g. bench_step-cuda-nvidia-h200.json)."""
    RESULTS.mkdir(exist_ok=True)
    threads = torch.get_num_threads()
    if CUDA:
        suffix = f"-cuda-{gpu_slug()}"
    else:
        suffix = "" if (threads, CLOCK_NAME) == (2, "wall") else f"-{threads}thread-{CLOCK_NAME}"
    path = RESULTS / f"{name}{suffix}.json"
    path.write_text(json.dumps(payload, indent=1, default=float))
    return path


def table(columns: list[str], rows: list[list]) -> str:
    """A markdown table; floats are shown with 3 significant digits."""

    def fmt(v):
        if isinstance(v, float):
            if math.isnan(v):
                return "—"
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x (the measured exponent)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


# --------------------------------------------------------------------------------------------
# Workloads


@dataclass
class Workload:
    """A target, a guide, a data set with example indices and the task loss of one benchmark."""

    name: str
    make_target: Callable[[], nn.Module]
    make_guide: Callable[[], nn.Module]
    dataset: object  # has .batch(idx) -> (inputs, y); with_index is handled here
    batch_size: int
    loss: Callable[[Tensor, Tensor], Tensor]
    source: str  # where the data comes from
    #: Guidance keyword arguments the workload is defined with: (a) and (b) pair the leaf layers
    #: (their definition in README.md, from before block discovery became the default).
    guidance_options: dict = field(default_factory=dict)

    def batch(self, k: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """Batch k in a fixed order: ``(x, y, index)``."""
        n = len(self.dataset)
        index = (torch.arange(self.batch_size) + k * self.batch_size) % n
        x, y = self.dataset.batch(index)[:2]
        if CUDA:  # as a training loop moves a whole batch, the example positions included
            x, y, index = x.to(DEVICE), y.to(DEVICE), index.to(DEVICE)
        return x, y, index


def _classification_loss(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y)


def _lm_loss(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def fcn_resnet(batch_size: int = 256, depth: int = 24, width: int = 512, guide_width: int = 16,
               examples: int = 2560) -> Workload:
    """(a) Deep FCN (BatchNorm, ReLU, dropout 0.1) ← ResNet-18 on 1×28×28 images."""
    try:
        dataset, source = data.create("fashion_mnist", train_size=examples).train, "Fashion-MNIST"
    except (FileNotFoundError, ValueError):
        g = torch.Generator().manual_seed(0)
        dataset = rg.data.TensorExamples(torch.randn(examples, 1, 28, 28, generator=g),
                                         torch.randint(0, 10, (examples,), generator=g))
        source = "random images (Fashion-MNIST not installed)"
    return Workload(
        f"deep_fcn {depth}x{width} <- resnet18 w{guide_width}, batch {batch_size}",
        lambda: models.create("deep_fcn", depth=depth, width=width),
        lambda: models.resnet18(width=guide_width),
        dataset, batch_size, _classification_loss, source, {"layers": "leaves"},
    )


def lstm_transformer(batch_size: int = 64, context: int = 128, examples: int = 1280) -> Workload:
    """(b) LSTM LM 2×256 ← causal Transformer LM d=128, 4 layers, on characters."""
    try:
        splits = data.create("shakespeare_char", context=context)
        dataset, vocab, source = splits.train, splits.vocab_size, "Shakespeare characters"
    except (FileNotFoundError, ValueError, ImportError):
        vocab = 65
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, vocab, (examples, context + 1), generator=g)
        dataset = rg.data.TensorExamples(tokens[:, :-1], tokens[:, 1:])
        source = "random tokens (Shakespeare not installed)"
    return Workload(
        f"lstm_lm 2x256 <- transformer_lm d128x4, {batch_size}x{context} tokens, vocab {vocab}",
        lambda: models.lstm_lm(vocab, hidden_dim=256, num_layers=2),
        lambda: models.transformer_lm(vocab, dim=128, depth=4),
        _Head(dataset, examples), batch_size, _lm_loss, source, {"layers": "leaves"},
    )


class _Head:
    """The first ``size`` examples of a data set (a fixed pool the guide cache covers)."""

    def __init__(self, dataset, size: int):
        self.dataset, self.size = dataset, min(size, len(dataset))

    def __len__(self) -> int:
        return self.size

    def batch(self, idx: Tensor):
        return self.dataset.batch(idx)


def plain_fcn(depth: int = 24, width: int = 512, in_features: int = 784, num_classes: int = 10) -> nn.Module:
    """An FCN as a user writes it: ``nn.Sequential`` of Linear + BatchNorm1d + ReLU, then the head."""
    layers: list[nn.Module] = [nn.Flatten()]
    for i in range(depth):
        layers += [nn.Linear(in_features if i == 0 else width, width), nn.BatchNorm1d(width), nn.ReLU()]
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def plain_cnn(depth: int = 8, width: int = 16, in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """A CNN without residuals, written by hand: ``depth`` × (3×3 conv + BatchNorm2d + ReLU) at
    full resolution, global average pooling, a linear head."""
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Conv2d(in_channels if i == 0 else width, width, 3, padding=1, bias=False),
                   nn.BatchNorm2d(width), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)]
    return nn.Sequential(*layers)


def _images(examples: int):
    try:
        return data.create("fashion_mnist", train_size=examples).train, "Fashion-MNIST"
    except (FileNotFoundError, ValueError):
        g = torch.Generator().manual_seed(0)
        return (rg.data.TensorExamples(torch.randn(examples, 1, 28, 28, generator=g),
                                       torch.randint(0, 10, (examples,), generator=g)),
                "random images (Fashion-MNIST not installed)")


def fcn_plain_cnn(batch_size: int = 256, examples: int = 2560) -> Workload:
    """(c) FCN 24×512 (nn.Sequential of Linear + BatchNorm1d + ReLU) ← plain CNN (8 conv + BN + ReLU,
    width 16, no residuals), both written as plain torch, on 1×28×28 images."""
    dataset, source = _images(examples)
    return Workload(
        f"plain fcn 24x512 <- plain cnn 8 conv w16, batch {batch_size}",
        lambda: plain_fcn(24, 512), lambda: plain_cnn(8, 16),
        dataset, batch_size, _classification_loss, source,
    )


class HandLSTM(nn.Module):
    """An LSTM language model as a user writes it: embedding, ``nn.LSTM``, linear head."""

    def __init__(self, vocab: int, embed_dim: int = 128, hidden_dim: int = 256, num_layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden_dim, num_layers, batch_first=True)
        self.head = nn.Linear(hidden_dim, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.lstm(self.embed(tokens))[0])


def gpt2_small(vocab: int, context: int = 128, dim: int = 128, depth: int = 4, heads: int = 4) -> nn.Module:
    """A Hugging Face GPT-2 from a small config: random weights, nothing downloaded."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab, n_positions=context, n_embd=dim, n_layer=depth, n_head=heads,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def lstm_gpt2(batch_size: int = 64, context: int = 128, examples: int = 1280) -> Workload:
    """(d) nn.LSTM LM 2×256 ← Hugging Face GPT-2 (d=128, 4 blocks, random weights), on characters,
    with ``Guidance`` defaults (stretch over the default candidate layers)."""
    dataset, vocab, source = _characters(context, examples)
    return Workload(
        f"nn.LSTM lm 2x256 <- HF GPT-2 d128x4 (random weights), {batch_size}x{context} tokens, vocab {vocab}",
        lambda: HandLSTM(vocab), lambda: gpt2_small(vocab, context),
        _Head(dataset, examples), batch_size, _lm_loss, source,
    )


def _characters(context: int, examples: int):
    try:
        splits = data.create("shakespeare_char", context=context)
        return splits.train, splits.vocab_size, "Shakespeare characters"
    except (FileNotFoundError, ValueError, ImportError):
        vocab = 65
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, vocab, (examples, context + 1), generator=g)
        return (rg.data.TensorExamples(tokens[:, :-1], tokens[:, 1:]), vocab,
                "random tokens (Shakespeare not installed)")


WORKLOADS = {"a": fcn_resnet, "b": lstm_transformer, "c": fcn_plain_cnn, "d": lstm_gpt2}


def seeded(make: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """``make()`` after seeding, on the benchmark's device (the same weights on every device)."""
    torch.manual_seed(seed)
    model = make()
    return model.to(DEVICE) if CUDA else model
