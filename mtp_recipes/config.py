"""The typed schema of a fine-tuning run, and the checks that run before any work starts.

Hydra composes YAML from ``configs/``; merging the result into these dataclasses rejects unknown keys
and wrong types, and :func:`validate` rejects out-of-range values, each in one line.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mtp_recipes.errors import ConfigError
from mtp_recipes.mtp.config import check_options as check_mtp_options

# The Hydra configs every command composes (shipped inside the package as ``mtp_recipes/configs``).
CONFIG_DIR = str(Path(__file__).resolve().parent / "configs")


@dataclass
class ModelConfig:
    path: Optional[str] = None  # checkpoint dir or Hub id; None builds `config` with random weights
    config: Optional[dict[str, Any]] = None  # HF config fields for a model built from scratch
    tokenizer: Optional[str] = None  # None: the checkpoint's own; "builtin:debug": the bundled one
    dtype: str = "float32"  # parameter dtype (master weights); compute dtype is trainer.precision
    attn_implementation: Optional[str] = "sdpa"
    experts_implementation: Optional[str] = None


@dataclass
class DataConfig:
    source: str = "builtin:pydoc"
    split: str = "train"
    format: str = "auto"
    text_field: str = "text"
    messages_field: str = "messages"
    text_sample_by: str = "line"
    max_documents: Optional[int] = None
    seq_len: int = 1024
    batch_size: int = 8
    packing: str = "first_fit"
    packing_buffer: int = 8192
    shuffle: bool = True
    seed: int = 0
    eval_fraction: float = 0.0  # share of the source's documents held out of training (validation, evaluate)
    eval_source: Optional[str] = None  # a separate held-out source instead (all its rows)
    eval_split: str = "train"  # the split of eval_source


@dataclass
class LambdaStep:
    step: int = 0
    value: float = 0.1


@dataclass
class MTPSection:
    num_layers: Optional[int] = None  # None: the checkpoint's own depth count
    block_types: Optional[Any] = None  # sublayers of one depth where the family allows a choice; None: checkpoint
    loss_scaling_factor: float = 0.1
    loss_scaling_schedule: list[LambdaStep] = field(default_factory=list)
    use_repeated_layer: bool = False
    normalization: str = "depth_tokens"
    init: str = "from_checkpoint"
    detach_backbone: bool = False
    train_only: bool = False
    zero_first_embedding: Optional[bool] = None  # None: what vLLM does for the family
    depth_weights: Optional[list[float]] = None  # relative weight of each depth's CE; None: equal
    depth_decay: Optional[float] = None  # β: depth k weighs β^(k-1) (instead of depth_weights)
    targets: str = "labels"  # labels | self (the backbone's own detached distribution at t+k) | mix
    self_weight: float = 0.5  # mix: the share of the backbone's distribution in depth k's target


@dataclass
class LoraSection:
    rank: int = 0  # LoRA rank r; 0: off (every backbone weight trains)
    alpha: float = 16.0  # scaling = alpha / rank
    dropout: float = 0.0
    target_modules: Optional[list[str]] = None  # module names or name endings; None: every linear layer LoRA can adapt
    mtp: str = "full"  # full: MTP depths train every weight | lora: adapters on their linear layers too
    export: str = "merged"  # merged: adapters merged into the checkpoint | adapter: peft adapter + MTP tensors
    seed: int = 0  # draws the adapters' initial A


@dataclass
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0


@dataclass
class TrainerConfig:
    max_steps: int = 100
    grad_accum_steps: int = 1
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32
    log_every: int = 1
    save_every: int = 0  # HF export every N steps; 0: only the final one
    save_final: bool = True
    checkpoint_every: int = 0  # exact-resume checkpoint every N steps; 0: none (SIGTERM still writes one)
    keep_last: int = 2  # resume checkpoints kept
    resume: Optional[str] = None  # null | auto (newest complete one in the run dir) | a checkpoint path
    overwrite: bool = False  # start afresh in a run dir that holds a previous run (its outputs are deleted)
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each block (GPU)
    dp_replicate: int = 1  # HSDP: model replicas (e.g. nodes), each sharded over world_size / dp_replicate ranks
    ep: int = 1  # expert parallelism: routed experts split over groups of ep ranks within a replica
    gpu_memory_gb: float = 80.0  # per GPU; on CUDA, setup refuses a memory plan over it (python -m mtp_recipes.plan)
    progress_bar: bool = True
    eval_every: int = 0  # validation on the held-out rows every N steps, and after the last step; 0: only then
    wandb_project: Optional[str] = None  # also log metrics to Weights & Biases (pip install mtp_recipes[wandb])


@dataclass
class ServingSection:
    engine: str = "vllm"  # vllm | sglang: the engine whose drafting math the MTP depths train with


@dataclass
class EvalConfig:
    num_prompts: int = 16  # held-out prompts python -m mtp_recipes.evaluate generates from
    max_new_tokens: int = 64  # greedy tokens per prompt
    prompt_tokens: int = 64  # text rows: prompt length in tokens (chat rows: up to the last assistant turn)
    temperature: float = 0.0  # > 0: also the expected acceptance of speculative sampling
    verify: bool = False  # also run a real speculative decoding loop and check it
    verify_prompts: int = 2
    output: Optional[str] = None  # eval.json path; None: the Hydra run directory


@dataclass
class FinetuneConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mtp: MTPSection = field(default_factory=MTPSection)
    lora: LoraSection = field(default_factory=LoraSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    serving: ServingSection = field(default_factory=ServingSection)


def to_schema(cfg: DictConfig | dict[str, Any]) -> DictConfig:
    """Merge a composed config into the schema: unknown keys and wrong types become a ConfigError."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg = {k: v for k, v in cfg.items() if k != "hydra"}
    try:
        merged = OmegaConf.merge(OmegaConf.structured(FinetuneConfig), cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        reason = str(e).splitlines()[0]
        raise ConfigError(f"bad config value {key}: {reason}").with_traceback(None) from None
    validate(merged)
    return merged


def validate(cfg: DictConfig) -> None:
    """Range checks that types alone cannot express."""
    checks = [
        (cfg.optim.lr > 0, f"optim.lr must be > 0, got {cfg.optim.lr}"),
        (cfg.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0"),
        (0 <= cfg.optim.min_lr_ratio <= 1, "optim.min_lr_ratio must be in [0, 1]"),
        (cfg.optim.max_grad_norm >= 0, "optim.max_grad_norm must be >= 0 (0 disables clipping)"),
        (
            len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas),
            f"optim.betas must be two values in [0, 1), e.g. [0.9, 0.95]; got {list(cfg.optim.betas)}",
        ),
        (
            all(s.value >= 0 and s.step >= 0 for s in cfg.mtp.loss_scaling_schedule),
            "mtp.loss_scaling_schedule entries need step >= 0 and value >= 0",
        ),
        *_lora_checks(cfg),
        (cfg.trainer.max_steps > 0, f"trainer.max_steps must be > 0, got {cfg.trainer.max_steps}"),
        (cfg.trainer.grad_accum_steps >= 1, "trainer.grad_accum_steps must be >= 1"),
        (cfg.trainer.checkpoint_every >= 0 and cfg.trainer.save_every >= 0, "checkpoint/save intervals must be >= 0"),
        (cfg.trainer.keep_last >= 1, "trainer.keep_last must be >= 1"),
        (cfg.trainer.dp_replicate >= 1, "trainer.dp_replicate must be >= 1"),
        (cfg.trainer.ep >= 1, f"trainer.ep must be >= 1, got {cfg.trainer.ep}"),
        (cfg.trainer.eval_every >= 0, f"trainer.eval_every must be >= 0, got {cfg.trainer.eval_every}"),
        (
            not (cfg.trainer.overwrite and cfg.trainer.resume is not None),
            "trainer.overwrite=true deletes the run dir's checkpoints, so it cannot go with trainer.resume; drop one",
        ),
        (cfg.trainer.device in ("auto", "cpu", "cuda"), "trainer.device must be auto, cpu or cuda"),
        (cfg.trainer.log_every >= 1, "trainer.log_every must be >= 1"),
        (cfg.model.dtype in ("float32", "bfloat16", "float16"), "model.dtype must be float32, bfloat16 or float16"),
        (cfg.data.packing in ("greedy", "first_fit"), "data.packing must be greedy or first_fit"),
        (
            cfg.data.format in ("auto", "text", "chat", "prompt_completion"),
            "data.format must be auto, text, chat or prompt_completion",
        ),
        (cfg.data.max_documents is None or cfg.data.max_documents >= 1, "data.max_documents must be >= 1 or null"),
        (cfg.trainer.precision in ("auto", "bf16", "fp32"), "trainer.precision must be auto, bf16 or fp32"),
        (cfg.data.seq_len >= 2, "data.seq_len must be >= 2"),
        (cfg.data.batch_size >= 1, "data.batch_size must be >= 1"),
        (0 <= cfg.data.eval_fraction < 1, f"data.eval_fraction must be in [0, 1), got {cfg.data.eval_fraction}"),
        (
            min(cfg.eval.num_prompts, cfg.eval.max_new_tokens, cfg.eval.prompt_tokens, cfg.eval.verify_prompts) >= 1,
            "eval.num_prompts, eval.max_new_tokens, eval.prompt_tokens and eval.verify_prompts must be >= 1",
        ),
        (cfg.eval.temperature >= 0, f"eval.temperature must be >= 0, got {cfg.eval.temperature}"),
        (
            cfg.serving.engine in ("vllm", "sglang"),
            f"serving.engine must be vllm or sglang, got {cfg.serving.engine!r}",
        ),
        (
            cfg.model.path is not None or cfg.model.config is not None,
            "set model.path (a checkpoint) or model.config (a model built from scratch)",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    check_mtp_options({k: v for k, v in cfg.mtp.items() if k not in ("block_types", "loss_scaling_schedule")})


def _lora_checks(cfg: DictConfig) -> list[tuple[bool, str]]:
    """The ``lora`` section's checks; peft is looked up without importing it (and torch)."""
    lora = cfg.lora
    return [
        (lora.rank >= 0, f"lora.rank must be >= 0 (0 turns LoRA off), got {lora.rank}"),
        (
            lora.rank == 0 or importlib.util.find_spec("peft") is not None,
            f"lora.rank={lora.rank} needs peft, which is not installed: pip install 'mtp_recipes[lora]' "
            "(or set lora.rank=0)",
        ),
        (lora.alpha > 0, f"lora.alpha must be > 0, got {lora.alpha}"),
        (0 <= lora.dropout < 1, f"lora.dropout must be in [0, 1), got {lora.dropout}"),
        (lora.mtp in ("full", "lora"), f"lora.mtp must be full or lora, got {lora.mtp}"),
        (lora.export in ("merged", "adapter"), f"lora.export must be merged or adapter, got {lora.export}"),
        (
            lora.target_modules is None or len(lora.target_modules) > 0,
            "lora.target_modules=[] adapts nothing: give module names, or null for every linear layer",
        ),
        (
            not (lora.rank > 0 and cfg.mtp.train_only),
            "lora.rank > 0 trains the backbone through adapters and mtp.train_only=true freezes it: turn one off",
        ),
    ]


def model_kwargs(cfg: DictConfig, frozen_dtype: Any = None) -> dict[str, Any]:
    """The keyword arguments ``MTPModel.from_config`` / ``from_pretrained`` get from a run config: the
    ``model`` kernels and master dtype, every ``mtp`` field but the λ schedule (the loss reads that), and
    the dtype frozen weights are held in (``mtp.train_only``'s backbone, the weights LoRA adapts; the compute
    dtype of a training run), and the LoRA settings (``None`` when ``lora.rank`` is 0)."""
    from mtp_recipes.lora import LoraSettings  # torch loads here; validation above must not need it

    mtp = OmegaConf.to_container(cfg.mtp, resolve=True)
    mtp.pop("loss_scaling_schedule")
    m = cfg.model
    return {
        "dtype": m.dtype,
        "attn_implementation": m.attn_implementation,
        "experts_implementation": m.experts_implementation,
        **mtp,
        "engine": cfg.serving.engine,
        "frozen_dtype": frozen_dtype,
        "lora": LoraSettings.from_section(cfg.lora),
    }
