"""The sections of a run config (``[model]``, ``[lora]``, ``[strategy]``, ...): each
key's type, default and meaning. :class:`fedelta.config.RunConfig` holds one of each."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelConfig:
    """Which pretrained model the federation adapts (``[model]``)."""

    name: str = "all-MiniLM-L6-v2"
    """A built-in alias (all-MiniLM-L6-v2, SmolLM2-135M-Instruct), a local Hugging Face
    model folder, or a hub id."""
    task: str = "classification"
    """``classification`` (sequence classification on labelled text: a new head) or
    ``causal-lm`` (instruction tuning on chat data: loss on response tokens)."""
    max_length: int = 64
    """Longest tokenised input (a whole chat for causal-lm); longer ones are truncated."""
    finetuning: str = "lora"
    """``lora`` trains LoRA adapters on ``lora.target-modules``; ``full`` trains those
    modules' weights and biases directly (no adapter), e.g. for sparse fine-tuning.
    The classification head trains in both."""
    pooling: str = "auto"
    """Classification: what the head reads: the ``[CLS]`` token through the model's
    pooler (``cls``), the attention-masked mean of the token states (``mean``), or
    what the checkpoint's sentence-transformers pooling config says (``auto``; ``cls``
    when it has none). all-MiniLM-L6-v2 was trained for mean pooling."""


@dataclass
class LoraSettings:
    """LoRA adapter shape shared by every client (``[lora]``)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: str = "query,key,value,dense"
    """Comma-separated module name suffixes, as in ``peft.LoraConfig``."""
    use_rslora: bool = False
    """Scale updates by ``alpha / sqrt(rank)`` (rsLoRA) instead of ``alpha / rank``."""
    client_ranks: str = ""
    """Comma-separated ranks assigned to clients by partition id (cycled); empty: all
    use ``r``. A SuperNode's ``lora-r`` node config overrides it. Each must be <= ``r``,
    the rank of the server's global adapter."""

    def target_module_list(self) -> list[str]:
        return [m.strip() for m in self.target_modules.split(",") if m.strip()]

    def client_rank_list(self) -> list[int]:
        """The ranks of ``client-ranks``; raises ``ValueError`` on a non-integer item."""
        return [int(item) for item in self.client_ranks.split(",") if item.strip()]


@dataclass
class DataConfig:
    """Where examples come from and how they are split across clients (``[data]``)."""

    name: str = "rotten-tomatoes"
    """A built-in corpus name or a local CSV/JSON/JSONL/Parquet file."""
    text_column: str = "text"
    label_column: str = "label"
    test_size: int = 1000
    """Examples held out before partitioning, for the server's central evaluation."""
    partitioner: str = "dirichlet"
    """``iid``, ``dirichlet`` (label skew) or ``topic`` (chat data: each site gets whole
    topics, the topics spread evenly over the sites)."""
    dirichlet_alpha: float = 0.5
    validation_fraction: float = 0.1
    """Share of each client's partition kept for federated evaluation."""
    labels: str = ""
    """Label names in class-id order, comma-separated; empty: those of ``name``'s corpus.
    The server fills them in before the first round, so sites training on their own
    data file (node config ``data-path``) map their labels to the same ids."""

    packing: bool = False
    """causal-lm: concatenate tokenised chats into ``model.max-length`` blocks instead
    of padding each one (faster on short chats; attention crosses chat boundaries)."""

    def label_list(self) -> tuple[str, ...]:
        return tuple(item.strip() for item in self.labels.split(",") if item.strip())


@dataclass
class GenerationConfig:
    """Sample answers written into a causal-lm run's report (``[generation]``)."""

    prompts: str = ""
    """User prompts separated by ``|``; empty: the first ``num-prompts`` held-out ones."""
    num_prompts: int = 4
    max_new_tokens: int = 48
    """Greedy decoding length per answer."""

    def prompt_list(self) -> list[str]:
        return [item.strip() for item in self.prompts.split("|") if item.strip()]


@dataclass
class StrategyConfig:
    """How the server turns client deltas into the next global adapter (``[strategy]``).

    Three choices compose: the server optimizer (``optimizer``), how LoRA factors are
    aggregated (``lora``) and how client updates are combined (``aggregator``), with
    optional norm bounding (``clip-norm``) before any of them.
    """

    optimizer: str = "fedavg"
    """Server optimizer: fedavg, fedavgm, fedadam, fedyogi, fedadagrad, fedprox, scaffold
    (control variates) or fednova (normalised averaging)."""
    lora: str = "naive"
    """LoRA aggregation: naive, ffa, fedsa, fedex or flora."""
    aggregator: str = "mean"
    """How client updates are combined: mean, median, trimmed-mean, krum, multi-krum, or
    a merge operator: ties, dare-ties, dare-linear or magnitude-prune."""
    merge_density: float = 0.2
    """Merge operators: share of each client's entries kept (TIES trim, DARE keep rate)."""
    clip_norm: float = 0.0
    """Norm bounding: scale each client's update to at most this L2 norm (0: off)."""
    server_lr: float = 0.0
    """Server learning rate; 0 picks the optimizer's default (1.0, adaptive ones 0.01)."""
    momentum: float = 0.9
    """FedAvgM server momentum."""
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    """Adaptivity of FedAdam/FedYogi/FedAdagrad (Reddi et al., 2021)."""
    proximal_mu: float = 0.01
    """FedProx: weight of the proximal term (mu/2)||w - w_global||^2 on clients."""
    trim_fraction: float = 0.1
    """Trimmed mean: share of the largest and of the smallest values dropped per coordinate."""
    byzantine: int = 1
    """Krum / Multi-Krum: number of faulty clients tolerated (f)."""
    krum_keep: int = 0
    """Multi-Krum: updates averaged (m); 0 keeps n - f."""
    fold_rank: int = 0
    """FedEx-LoRA / FLoRA: rank of the truncated SVD that carries the folded base-weight
    correction to clients; 0 sends it dense (exact)."""
    rank_projection: str = "truncate"
    """How a client of lower rank takes the global adapter: the first components
    (``truncate``) or the top singular components (``svd``)."""
    head: str = "joint"
    """Classification head: ``joint`` (trains with LoRA every round), ``ncm`` (set to
    the federated class means before round 1, then joint: FedNCM+FT), ``lp-ft`` (the
    first ``head-rounds`` rounds train only the head) or ``fedbabu`` (head frozen
    while LoRA trains; the last ``head-rounds`` rounds train only the head). See
    docs/strategies.md."""
    head_rounds: int = 1
    """lp-ft: head-only rounds at the start; fedbabu: head-only rounds at the end."""


@dataclass
class CompressionConfig:
    """How clients sparsify and quantize the deltas they upload (``[compression]``).

    Sparsity and quantization compose: the kept entries are quantized. The server
    decodes every reply against what this table says it must look like.
    """

    sparsity: str = "none"
    """``none``, ``top-k`` (largest entries of the delta), ``random-mask`` (a mask
    seeded by the round, shared by all clients: no indices sent), ``spiel``
    (train a fixed-density index set, prune and regrow) or ``lift`` (train the
    principal weights of a low-rank approximation)."""
    density: float = 0.05
    """Share of each tensor's entries a sparse method keeps."""
    error_feedback: bool = True
    """Top-k, random masks and quantization: keep what was not sent and add it to the
    next round's delta. Training-time masks (spiel, lift) send exactly what they train."""
    quantization: str = "none"
    """Values on the wire: ``none`` (fp32), ``fp16``, ``int8`` (one scale per tensor)
    or ``int8-block`` (one scale per ``block-size`` values)."""
    block_size: int = 256
    stochastic_rounding: bool = False
    """int8: round up or down at random in proportion (unbiased) instead of to nearest."""
    weighting: str = "all"
    """Sparse averaging per coordinate: over ``all`` clients of the round (a client
    that did not send a coordinate counts as zero: the mean of the densified deltas)
    or over the ``senders`` of that coordinate only."""
    half_finetuning: bool = False
    """Half Fine-Tuning: each round the server's seeded draw trains half of the
    modules and freezes the rest; clients upload only the trained half."""
    regrow_interval: int = 10
    """spiel: local steps between prune-and-regrow updates of the index set (0: never)."""
    regrow_fraction: float = 0.2
    """spiel: share of the index set replaced at each update."""
    lift_rank: int = 16
    """lift: rank of the approximation whose largest entries are trained."""


@dataclass
class ExportConfig:
    """Which model a run exports (``[export]``): the last global model, or a merge of
    the global deltas of all rounds."""

    merge: str = "none"
    """``none`` (the last round's model), a merge operator over the round deltas
    (``task-arithmetic``, ``ties``, ``dare-ties``, ``dare-linear``,
    ``magnitude-prune``), ``ema`` (exponential moving average of the global models)
    or ``lines`` (the final delta scaled by depth)."""
    density: float = 0.2
    """Merge operators: share of each round delta's entries kept."""
    scale: float = 1.0
    """Merge operators: the merged delta is multiplied by this (task arithmetic's lambda)."""
    ema_decay: float = 0.5
    """ema: weight of the average so far against each new global model."""
    lines_alpha: float = 0.5
    lines_beta: float = 0.5
    """lines: the delta of block l of L is scaled by alpha + beta * (l - 1) / (L - 1)."""


@dataclass
class PrivacyConfig:
    """Differential privacy and secure aggregation (``[privacy]``).

    Sample-level DP-SGD protects each training example at its site (Opacus, per-site
    accountant). Client-level DP protects each site's whole contribution to a round
    (clip the delta, add Gaussian noise at the server or on the clients). Secure
    aggregation (SecAgg+) hides each site's upload from the server.
    """

    dp_sgd: bool = False
    """Train every client with DP-SGD (per-example clipping and noise, Poisson sampling)."""
    noise_multiplier: float = 0.0
    """DP-SGD noise std over ``max-grad-norm``; 0 derives it per site from ``target-epsilon``."""
    target_epsilon: float = 0.0
    """DP-SGD: each site's privacy budget over the run. With ``noise-multiplier`` = 0 the
    noise is chosen so that a site trained in every round ends at this epsilon; a site
    whose next round would exceed it refuses to train. 0 (only with an explicit noise
    multiplier): no limit, epsilon is reported only."""
    max_grad_norm: float = 1.0
    """DP-SGD: per-example gradient clipping norm."""
    delta: float = 1e-5
    """The delta of (epsilon, delta)-DP, for DP-SGD and client-level DP alike."""
    client_dp: str = "none"
    """Client-level DP on deltas: ``none``, ``central`` (the server clips each update and
    noises the mean: a trusted server) or ``distributed`` (each client clips its delta
    and adds its share of the noise; pair it with ``secure-aggregation``)."""
    client_clip_norm: float = 0.1
    """Client-level DP: L2 bound on each site's update (C)."""
    client_noise_multiplier: float = 0.0
    """Client-level DP: noise std on the sum of updates over C; 0 derives it from
    ``client-target-epsilon``."""
    client_target_epsilon: float = 0.0
    """Client-level DP: epsilon over ``num-server-rounds`` rounds."""
    seeded_noise: bool = False
    """Draw DP noise from generators seeded by the run seed (reproducible experiments).
    Off: fresh operating-system entropy, so nobody who knows the config can subtract
    the noise; keep it off in production."""
    secure_aggregation: bool = False
    """SecAgg+ (Flower's protocol): the server learns only the sum of the uploads.
    Needs a linear strategy (see ``fedelta strategies``)."""
    secagg_num_shares: float = 1.0
    """SecAgg+: shares each secret is split into, as a share of the round's clients
    (<= 1) or a count (> 1)."""
    secagg_reconstruction_threshold: float = 0.7
    """SecAgg+: shares needed to reconstruct a secret, as a share of ``secagg-num-shares``
    (<= 1) or a count (> 1); lower tolerates more dropouts, higher resists collusion."""
    secagg_clipping_range: float = 1.0
    """SecAgg+: uploads are quantized over [-range, range]; a client with a larger entry
    fails the round with a message naming it, rather than being clipped silently."""
    secagg_quantization_range: int = 4194304
    """SecAgg+: integer levels over the clipping range (2**22)."""
    secagg_max_weight: float = 1000.0
    """SecAgg+: the example count that maps to the full quantization range (precision
    per entry: 2 x clipping-range / quantization-range x max-weight / examples); a site
    with more examples must keep its entries within clipping-range x max-weight /
    examples. Unused under client-level DP (every site weighs 1)."""


@dataclass
class SimulationConfig:
    """Settings for ``fedelta simulate`` only (``[simulation]``)."""

    num_supernodes: int = 8
    client_cpus: float = 2.0
    """CPU cores (torch threads) per ClientApp; Ray runs ``cores / client-cpus`` at once."""
