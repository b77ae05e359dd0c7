"""A method is one typed record of parts; `METHODS` holds the paper's and
the baselines'.

    Method(name, summary,
           network=Network(linearized, grad_mode, bn_train, trainable),
           terms=(LabelLoss('mse', 15.0), ...),       # data_terms
           penalty=Penalty('kfac', proximal, every, head) or None,
           optimizer=Optimizer('adam', 1e-4, ...),
           replay=Replay(enabled, insert, required, logit_weight, ...),
           trainer='sequential' | 'joint' | 'ncm' | 'ranpac')

Every part is a frozen dataclass, so a `Method` is hashable and rides in
the `TrainState` as a static field. `dlcft_jax.step` reads the network, the
terms and the optimizer chain built from the penalty and the optimizer
parts; the runner (`experiments/`) reads the replay policy and the trainer;
`table()` renders the methods table of the docs from the same records.
Adding a method is adding a record here (and its test): nothing in the step
or the runner names a method.

A record is changed part by part, `method.replace(optimizer=dict(
learning_rate=1e-3), penalty=None)`: a dict updates that part's fields, a
part (or None) replaces it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import optax

from dlcft_jax import curvature_kinds as kinds
from dlcft_jax import data_terms as dterms
from dlcft_jax import penalty as pen_lib
from dlcft_jax import solvers

TRAINERS = ('sequential', 'joint', 'ncm', 'ranpac')


def _check(checks: list[tuple[bool, str]], where: str) -> None:
    for ok, msg in checks:
        if not ok:
            raise ValueError(f'{where}: {msg}.')


@dataclasses.dataclass(frozen=True)
class Network:
    """What is trained.

    Attributes:
      linearized: train g_lin(x; ψ0 + Δψ) = g(ψ0) + J(ψ0)Δψ (DLCFT) instead
        of the non-linear network g(x; ψ0 + Δψ); the head is exact either way.
      grad_mode: 'jvp' or 'vjp' (`linearization.tangent_apply`).
      bn_train: non-linear network only: BatchNorm uses batch statistics and
        updates its running averages in training (Mammoth's practice; the
        paper freezes them).
      trainable: which backbone leaves train (`linearization.split`): None
        (conv / dense kernels and biases), 'all' (BatchNorm scale and bias
        too) or 'none' (the head alone).
    """

    linearized: bool = True
    grad_mode: str = 'jvp'
    bn_train: bool = False
    trainable: str | None = None

    def __post_init__(self):
        _check(
            [
                (
                    self.grad_mode in ('vjp', 'jvp'),
                    f"grad_mode must be 'vjp' or 'jvp', got {self.grad_mode!r}",
                ),
                (
                    not (self.bn_train and self.linearized),
                    'bn_train needs the non-linear network (linearized=False):'
                    ' the linearized model is defined at fixed BatchNorm '
                    'statistics',
                ),
                (
                    self.trainable in (None, 'all', 'none'),
                    "trainable must be None, 'all' or 'none', got "
                    f'{self.trainable!r}',
                ),
            ],
            'Network',
        )


@dataclasses.dataclass(frozen=True)
class Penalty:
    """The quadratic penalty of past tasks (`penalty.quadratic_penalty`).

    Attributes:
      kind: the curvature: 'kfac', 'tkfac' (trace-restricted K-FAC), 'ewc'
        (diagonal true Fisher) or 'mas' (MAS importance).
      proximal: κ of the proximal damping κ(θ − θ_{t−1}) added to the
        gradient (0 disables it).
      every: compute the curvature product every this many steps and reuse
        it in between (1: every step, exact).
      head: include the head in the penalty (False for task-IL, whose
        per-task heads the paper leaves unregularized).
    """

    kind: str = 'kfac'
    proximal: float = 1e-4
    every: int = 1
    head: bool = True

    def __post_init__(self):
        _check(
            [
                (
                    self.kind in kinds.KINDS,
                    f'kind must be one of {tuple(kinds.KINDS)}, got '
                    f'{self.kind!r}',
                ),
                (self.proximal >= 0, 'proximal must be >= 0'),
                (self.every >= 1, 'every must be >= 1'),
            ],
            'Penalty',
        )

    def curvature_kind(self) -> kinds.CurvatureKind:
        return kinds.KINDS[self.kind](self.head)

    def transform(self) -> optax.GradientTransformation:
        """The penalty link of the optimizer chain."""
        return pen_lib.quadratic_penalty(
            self.curvature_kind(), proximal=self.proximal, every=self.every
        )


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """The optimizer after the penalty: clip → coupled L2 → Adam / SGD →
    −η_k, with η_k the per-task schedule.

    Attributes:
      name: 'adam', 'sgd' (heavy-ball momentum; momentum 0 is plain SGD) or
        'kfac' (`solvers.kfac_solver`: K-FAC-preconditioned updates sized
        by exact minimisation of the quadratic model; no clipping, schedule
        or learning rate: the step size is solved for).
      learning_rate: η at the start of each task (Adam, SGD).
      schedule: 'linear' (to 0 at the end of the task) or 'constant'.
      momentum: SGD momentum.
      b1, b2, eps: Adam's parameters.
      weight_decay: coupled L2 coefficient λ.
      clip_norm: global-norm clipping threshold (0 disables it).
      damping: 'kfac': λ of the preconditioner and the quadratic model.
      refresh_every: 'kfac': re-estimate the current task's factors every
        this many steps.
      update_untouched_outputs: also update the head outputs that no data
        term of the batch touches (other tasks' heads in task-IL, classes
        not seen yet in class-IL). False (default): their rows stay put
        (`train_state.keep_untouched_outputs`).
    """

    name: str = 'adam'
    learning_rate: float = 1e-4
    schedule: str = 'linear'
    momentum: float = 0.9
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 1e-5
    clip_norm: float = 1.0
    damping: float = 1e-3
    refresh_every: int = 20
    update_untouched_outputs: bool = False

    def __post_init__(self):
        _check(
            [
                (
                    self.name in ('adam', 'sgd', 'kfac'),
                    f"name must be 'adam', 'sgd' or 'kfac', got {self.name!r}",
                ),
                (
                    self.schedule in ('linear', 'constant'),
                    "schedule must be 'linear' or 'constant', got "
                    f'{self.schedule!r}',
                ),
                (self.learning_rate > 0, 'learning_rate must be > 0'),
                (
                    self.damping > 0 and self.refresh_every >= 1,
                    'damping must be > 0 and refresh_every >= 1',
                ),
                (
                    min(self.weight_decay, self.clip_norm, self.momentum) >= 0,
                    'weight_decay, clip_norm and momentum must be >= 0',
                ),
            ],
            'Optimizer',
        )

    def chain(
        self, penalty: Penalty | None = None
    ) -> optax.GradientTransformation:
        """The optax chain: [penalty →] clip → L2 → Adam/SGD → −η_k, or
        [penalty →] L2 → K-FAC solver."""
        parts = [] if penalty is None else [penalty.transform()]
        if self.name == 'kfac':
            if self.weight_decay > 0:
                parts.append(optax.add_decayed_weights(self.weight_decay))
            kind = kinds.KFAC() if penalty is None else penalty.curvature_kind()
            proximal = 0.0 if penalty is None else penalty.proximal
            parts.append(
                solvers.kfac_solver(
                    kind,
                    damping=self.damping,
                    refresh_every=self.refresh_every,
                    diagonal=proximal + self.weight_decay,
                )
            )
            return optax.chain(*parts)
        if self.clip_norm > 0:
            parts.append(optax.clip_by_global_norm(self.clip_norm))
        if self.weight_decay > 0:
            parts.append(optax.add_decayed_weights(self.weight_decay))
        if self.name == 'adam':
            parts.append(optax.scale_by_adam(self.b1, self.b2, self.eps))
        elif self.momentum > 0:
            parts.append(optax.trace(decay=self.momentum))
        parts.append(
            pen_lib.per_task_schedule(self.learning_rate, self.schedule)
        )
        return optax.chain(*parts)


@dataclasses.dataclass(frozen=True)
class Replay:
    """How the method uses a replay buffer (the benchmark sizes it).

    Attributes:
      enabled: replayed rows join each step's batch.
      insert: when examples enter the reservoir: 'task_end' (all of a
        task's training examples, after it) or 'stream' (each training
        batch after its step, Mammoth's way).
      required: the method is defined by its buffer (ER, DER, DER++): a run
        without one is refused.
      logit_weight: α > 0: the logits are stored at insertion and the first
        draw's rows enter through DER's `StoredLogits` term with weight α
        (the current rows' label loss is then their own mean); 0: replayed
        rows share the label loss with the current rows (ER, DLCFT).
      second_draw_weight: β > 0: a second draw enters the label loss with
        weight β (DER++).
      label_weight: ρ ≥ 0, the weight of the replayed rows in the label
        loss when they share it with the current rows (1: a replayed row
        counts as a current one; 0: replay off). Under an exact penalty the
        buffer counts the old tasks a second time; ρ sets by how much.
    """

    enabled: bool = True
    insert: str = 'task_end'
    required: bool = False
    logit_weight: float = 0.0
    second_draw_weight: float = 0.0
    label_weight: float = 1.0

    def __post_init__(self):
        _check(
            [
                (
                    self.insert in ('task_end', 'stream'),
                    "insert must be 'task_end' or 'stream', got "
                    f'{self.insert!r}',
                ),
                (
                    min(
                        self.logit_weight,
                        self.second_draw_weight,
                        self.label_weight,
                    )
                    >= 0,
                    'logit_weight, second_draw_weight and label_weight must '
                    'be >= 0',
                ),
            ],
            'Replay',
        )

    @property
    def draws(self) -> int:
        """Replay draws per step (when a buffer is used)."""
        return 2 if self.second_draw_weight > 0 else 1


_PARTS = {
    'network': Network,
    'penalty': Penalty,
    'optimizer': Optimizer,
    'replay': Replay,
}


@dataclasses.dataclass(frozen=True)
class Method:
    """One method: its parts, its name and one line on what it is.

    Attributes:
      name: what `--config.method=` calls it.
      summary: one line for the docs' methods table and `--help`.
      network: the `Network` part (what trains).
      terms: the data terms the step sums (`data_terms`): the label loss
        first, then e.g. DER's `StoredLogits` or LwF's `Distillation`.
      penalty: the `Penalty` of past tasks, or None.
      optimizer: the `Optimizer` part.
      replay: the `Replay` buffer policy.
      trainer: 'sequential' (task by task), 'joint' (once on the union of
        the tasks: the upper bound), or a training-free classifier on
        frozen features: 'ncm' or 'ranpac'.
      closed_form_head: at the end of each task the head is set to the
        exact minimiser of the task's objective given the final features
        (`solvers.solve_head`, α-MSE only), and the task's head curvature to
        the exact E[z̄z̄ᵀ] of its examples.
      reference: where the method and its defaults come from.
    """

    name: str = 'dlcft'
    summary: str = ''
    network: Network = Network()
    terms: tuple[Any, ...] = (dterms.LabelLoss(),)
    penalty: Penalty | None = Penalty()
    optimizer: Optimizer = Optimizer()
    replay: Replay = Replay()
    trainer: str = 'sequential'
    closed_form_head: bool = False
    reference: str = ''

    def __post_init__(self):
        labels = [t for t in self.terms if isinstance(t, dterms.LabelLoss)]
        _check(
            [
                (
                    self.trainer in TRAINERS,
                    f'trainer must be one of {TRAINERS}, got {self.trainer!r}',
                ),
                (len(self.terms) > 0, 'terms must not be empty'),
                (len(labels) <= 1, 'at most one LabelLoss term'),
                (
                    self.replay.logit_weight == 0
                    or any(
                        isinstance(t, dterms.StoredLogits) for t in self.terms
                    ),
                    'replay.logit_weight > 0 needs the StoredLogits term',
                ),
                (
                    not self.closed_form_head
                    or (self.loss == 'mse' and bool(labels)),
                    'closed_form_head needs the α-MSE LabelLoss',
                ),
            ],
            f'Method {self.name!r}',
        )

    @property
    def loss(self) -> str:
        """The label loss's kind, 'mse' or 'ce' (the output distribution the
        curvature's pseudo-targets are drawn from)."""
        for term in self.terms:
            if isinstance(term, dterms.LabelLoss):
                return term.kind
        return 'mse'

    @property
    def trains(self) -> bool:
        """Whether the method takes gradient steps."""
        return self.trainer in ('sequential', 'joint')

    def make_optimizer(self) -> optax.GradientTransformation:
        """The optimizer part's chain with the penalty link first."""
        return self.optimizer.chain(self.penalty)

    def replace(self, **changes) -> Method:
        """A copy with parts replaced (a part, None) or updated (a dict of
        its fields); other fields as `dataclasses.replace`."""
        out = {}
        for key, value in changes.items():
            if key in _PARTS and isinstance(value, dict):
                current = getattr(self, key)
                if current is None:
                    current = _PARTS[key]()
                value = dataclasses.replace(current, **value)
            out[key] = value
        return dataclasses.replace(self, **out)

    def replace_terms(self, kind: type, **fields) -> Method:
        """A copy with every term of type `kind` updated."""
        terms = tuple(
            dataclasses.replace(t, **fields) if isinstance(t, kind) else t
            for t in self.terms
        )
        return dataclasses.replace(self, terms=terms)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready description (results.json's 'method')."""
        out = dataclasses.asdict(self)
        out['terms'] = [
            {'term': type(t).__name__, **dataclasses.asdict(t)}
            if dataclasses.is_dataclass(t)
            else {'term': repr(t)}
            for t in self.terms
        ]
        return out

    # -- one line per part, for the methods table ---------------------------

    def describe(self) -> dict[str, str]:
        net = self.network
        model = 'linearized' if net.linearized else 'non-linear'
        if net.bn_train:
            model += ', BN trained'
        if net.trainable is not None:
            model += f', trainable={net.trainable}'
        terms = []
        for t in self.terms:
            if isinstance(t, dterms.LabelLoss):
                terms.append('α-MSE' if t.kind == 'mse' else 'CE')
            elif isinstance(t, dterms.StoredLogits):
                terms.append('stored logits')
            elif isinstance(t, dterms.Distillation):
                terms.append(f'distill ({t.kind})')
            else:
                terms.append(type(t).__name__)
        opt = self.optimizer
        optim = f'{opt.name} {opt.learning_rate:g}'
        if opt.name == 'kfac':
            optim = f'K-FAC, exact step, λ {opt.damping:g}'
        if opt.name == 'sgd':
            optim += f', m {opt.momentum:g}'
        if opt.schedule == 'constant':
            optim += ', constant'
        if self.closed_form_head:
            optim += ' + closed-form head'
        rep = self.replay
        if not rep.enabled:
            replay = '—'
        else:
            replay = 'labels' if rep.logit_weight == 0 else 'logits'
            if rep.second_draw_weight:
                replay += ' + labels'
            replay += f', {rep.insert.replace("_", " ")}'
            if rep.label_weight != 1:
                replay += f', ρ {rep.label_weight:g}'
        return {
            'method': self.name,
            'trainer': self.trainer,
            'network': model if self.trains else 'frozen ψ0',
            'terms': ' + '.join(terms) if self.trains else '—',
            'penalty': self.penalty.kind if self.penalty else '—',
            'optimizer': optim if self.trains else '—',
            'replay': replay,
            'what it is': self.summary,
        }


def table(methods: dict[str, Method] | None = None) -> str:
    """The methods table of the docs (markdown), one row per record."""
    rows = [m.describe() for m in (methods or METHODS).values()]
    cols = list(rows[0])
    lines = [
        '| ' + ' | '.join(cols) + ' |',
        '|' + '---|' * len(cols),
    ]
    for row in rows:
        cells = [row[c].replace('|', '\\|') for c in cols]
        cells[0] = f'`{cells[0]}`'
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


# ----------------------------------------------------------------------------
# The records. The benchmark config fixes the batch, the replay batch, the
# buffer, the steps and the augmentation, the same for every method.

_LIN = Network()
_NONLIN = Network(linearized=False)
_MSE = (dterms.LabelLoss('mse'),)
_CE = (dterms.LabelLoss('ce'),)
#: DLCFT's optimizer (the authors' code): Adam 1e-4, L2 1e-5, clip 1,
#: linear decay per task.
_ADAM = Optimizer()
#: The paper's non-linear baselines: SGD momentum 0.9, lr 1e-3.
_SGD = Optimizer(name='sgd', learning_rate=1e-3)
#: Mammoth's: plain SGD lr 0.03, no momentum, decay, clipping or schedule.
_MAMMOTH = Optimizer(
    name='sgd',
    learning_rate=0.03,
    momentum=0.0,
    weight_decay=0.0,
    clip_norm=0.0,
    schedule='constant',
)
#: Mammoth's ER / DER / DER++ network: every weight, BatchNorm trained.
_MAMMOTH_NET = Network(linearized=False, bn_train=True, trainable='all')
_NO_REPLAY = Replay(enabled=False)
_SHON = 'Shon et al., 2022 (the authors\' code)'
_MAMMOTH_REF = 'Buzzega et al., 2020; github.com/aimagelab/mammoth'


def _m(name, summary, **parts) -> Method:
    return Method(name=name, summary=summary, **parts)


def _kfac(name, summary, network, terms, optimizer) -> Method:
    return _m(
        name,
        summary,
        network=network,
        terms=terms,
        penalty=Penalty('kfac'),
        optimizer=optimizer,
        reference=_SHON,
    )


def _nonlinear(name, summary, terms=_CE, penalty=None, **parts) -> Method:
    return _m(
        name,
        summary,
        network=_NONLIN,
        terms=terms,
        penalty=penalty,
        optimizer=_SGD,
        **parts,
    )


def _buffer(name, summary, terms=_CE, **replay) -> Method:
    return _m(
        name,
        summary,
        network=_MAMMOTH_NET,
        terms=terms,
        penalty=None,
        optimizer=_MAMMOTH,
        replay=Replay(insert='stream', required=True, **replay),
        reference=_MAMMOTH_REF,
    )


_DER_TERMS = (dterms.LabelLoss('ce'), dterms.StoredLogits())

_RECORDS = [
    _kfac(
        'dlcft',
        'DLCFT: linearized backbone, α-MSE (α = 15), K-FAC of the linearized '
        'model and the exact head block; proximal κ 1e-4.',
        _LIN,
        _MSE,
        _ADAM,
    ),
    _nonlinear('finetune', 'Fine-tuning, no penalty (non-linear + CE).'),
    _nonlinear(
        'finetune_mse',
        'Fine-tuning with the α-MSE loss.',
        terms=_MSE,
    ),
    _m(
        'joint',
        "The upper bound: DLCFT's model and optimizer trained once on the "
        'union of all tasks for the sequence\'s total steps.',
        penalty=None,
        replay=_NO_REPLAY,
        trainer='joint',
        reference=_SHON,
    ),
    _nonlinear(
        'joint_finetune',
        "The non-linear bound: finetune's network, loss and optimizer on the "
        'union of all tasks.',
        replay=_NO_REPLAY,
        trainer='joint',
    ),
    _nonlinear(
        'ewc',
        'EWC: diagonal true Fisher (one sampled label per example), '
        '(L + t·R)/(t+1).',
        penalty=Penalty('ewc'),
        reference='Kirkpatrick et al., 2017',
    ),
    _nonlinear(
        'mas',
        'MAS: Ω = E|∂‖f(x)‖²/∂θ|, weighted as EWC.',
        penalty=Penalty('mas'),
        reference='Aljundi et al., 2018',
    ),
    _nonlinear(
        'lwf',
        "LwF: KL to the previous model's softmax (T = 1) on the current "
        'inputs over the old outputs, weight t.',
        terms=(dterms.LabelLoss('ce'), dterms.Distillation('kl')),
        reference='Li & Hoiem, 2016',
    ),
    _nonlinear(
        'lwf_mse',
        'LwF with α-MSE and ½‖f − f_old‖² distillation.',
        terms=(dterms.LabelLoss('mse'), dterms.Distillation('mse')),
        reference='Li & Hoiem, 2016',
    ),
    _nonlinear(
        'osla',
        'OSLA: the K-FAC Laplace penalty of the non-linear network with CE.',
        penalty=Penalty('kfac'),
        reference='Ritter et al., 2018',
    ),
    _kfac(
        'kfac_lin_mse',
        'Ablation: linearized + MSE + K-FAC (= dlcft).',
        _LIN,
        _MSE,
        _ADAM,
    ),
    _kfac(
        'kfac_lin_sce',
        'Ablation: linearized + CE + K-FAC, Adam.',
        _LIN,
        _CE,
        _ADAM,
    ),
    _kfac(
        'kfac_nonlin_mse',
        'Ablation: non-linear + MSE + K-FAC, SGD.',
        _NONLIN,
        _MSE,
        _SGD,
    ),
    _kfac(
        'kfac_nonlin_sce',
        'Ablation: non-linear + CE + K-FAC, SGD (= osla).',
        _NONLIN,
        _CE,
        _SGD,
    ),
    _buffer('er', 'ER: CE on current and replayed rows together.'),
    _buffer(
        'der',
        'DER: CE on current rows + α·mean (f − z)² on replayed rows, z the '
        'logits stored at insertion (α = 0.3).',
        terms=_DER_TERMS,
        logit_weight=0.3,
    ),
    _buffer(
        'derpp',
        'DER++: DER (α = 0.1) + β·CE on a second replayed batch (β = 0.5).',
        terms=_DER_TERMS,
        logit_weight=0.1,
        second_draw_weight=0.5,
    ),
    _m(
        'dlcft_kfac',
        'DLCFT minimised with K-FAC-preconditioned steps sized by exact '
        'minimisation of the quadratic model (Martens & Grosse, 2015).',
        optimizer=Optimizer(name='kfac'),
        reference=f'{_SHON}; Martens & Grosse, 2015',
    ),
    _m(
        'dlcft_head',
        "DLCFT whose head is solved in closed form at each task's end: the "
        'exact minimiser of the task objective given the final features.',
        closed_form_head=True,
        reference=_SHON,
    ),
    # A composition that no paper names, one record and no code: DLCFT whose
    # replayed rows are held to the logits stored when they entered the
    # buffer (DER's term) instead of to their labels.
    _m(
        'dlcft_der',
        "DLCFT with DER's stored-logit term (α = 0.3) on replayed rows "
        'instead of their labels.',
        terms=(dterms.LabelLoss('mse'), dterms.StoredLogits()),
        replay=Replay(logit_weight=0.3),
        reference=f'{_SHON}; {_MAMMOTH_REF}',
    ),
    _nonlinear(
        'ncm',
        'Nearest class mean of frozen pre-trained features (cosine; '
        'SimpleCIL). No training.',
        replay=_NO_REPLAY,
        trainer='ncm',
        reference='Zhou et al., 2023',
    ),
    _nonlinear(
        'ranpac',
        'RanPAC: fixed random ReLU projection + ridge classifier in closed '
        'form (ridge chosen on 20 % of task 1). No training.',
        replay=_NO_REPLAY,
        trainer='ranpac',
        reference='McDonnell et al., 2023',
    ),
]

#: Every method by name, in the order of the docs' table.
METHODS: dict[str, Method] = {m.name: m for m in _RECORDS}


def get(name: str) -> Method:
    """The record called `name` (KeyError if unknown)."""
    return METHODS[name]
