"""The request and response bodies of the REST API (`/api/v1`), as pydantic models: what a client sends and
reads back, with the bounds FastAPI checks (422) before a handler runs. They are the schemas of the OpenAPI
document; the rules that need the workspace live in services.py."""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from ..lab.facts.experiments import EXPERIMENTS as FACTS_EXPERIMENTS
from ..lab.interp.steer import MAX_COEF
from ..lab.selfplay.text import REWARDS, TextSelfPlayConfig
from ..tune.lora import MAX_ALPHA

SERVER_REWARDS = tuple(r for r in REWARDS if r != "file")  # `file` runs user code: CLI only
MAX_SEEDS = 5


class Book(BaseModel):
    name: str
    size_bytes: int
    chars: int
    encoding: str
    created_at: float
    words: int | None = None
    lines: int | None = None
    unique_chars: int | None = None


class BookPreview(BaseModel):
    name: str
    text: str
    truncated: bool


class ModelSpec(BaseModel):
    """A preset (family-size, e.g. `gpt2-tiny`) with optional overrides, or custom fields on a family."""
    model_config = ConfigDict(extra="forbid")
    preset: str | None = Field(None, description="e.g. gpt2-tiny, llama-small; see /api/v1/presets",
                               max_length=40)
    family: Literal["gpt", "gpt2", "llama"] | None = None
    n_layer: int | None = Field(None, ge=1, le=128)
    n_head: int | None = Field(None, ge=1, le=128)
    n_kv_head: int | None = Field(None, ge=1, le=128)
    n_embd: int | None = Field(None, ge=1, le=16384)
    block_size: int | None = Field(None, ge=8, le=32768)
    intermediate_size: int | None = Field(None, ge=1, le=65536)
    dropout: float | None = Field(None, ge=0.0, lt=1.0)
    tokenizer_kind: Literal["bpe", "char", "word"] = "bpe"
    vocab_size: int | None = Field(None, ge=5, le=262144, description="tokenizer and embedding size")
    batch_size: int = Field(16, ge=1, le=4096, description="for the training-memory estimate only")


class ModelCreate(ModelSpec):
    name: str = Field(..., min_length=1, max_length=100)


class Estimate(BaseModel):
    config: dict[str, Any]
    parameters: int
    inference_bytes: int
    training_bytes: int
    batch_size: int
    seq_len: int
    memory_budget_bytes: int
    fits: bool
    reason: str | None = None


class ModelInfo(BaseModel):
    name: str
    family: str
    preset: str | None
    config: dict[str, Any]
    parameters: int
    tokenizer_kind: str
    vocab_size: int
    trained: bool
    quantized: bool = Field(False, description="int8/int4 weights (quantization.json): not exported to HF or GGUF, "
                                               "not trained further")
    trained_run_id: int | None
    trained_steps: int | None
    active_run_id: int | None = Field(description="the queued or running training run of this model")
    selfplay_run_ids: list[int] = Field(default_factory=list, description="queued or running self-play runs that "
                                        "read this model (start from it, or score with it as the judge)")
    origin: dict[str, Any] | None = Field(None, description="how a derived model was made, e.g. {kind: selfplay, "
                                                             "parent, reward, judge, run_id, iterations}; "
                                                             "cleared when the model is trained from scratch, "
                                                             "kept when training continues from its weights")
    lineage: list[int] = Field(default_factory=list, description="the runs whose weights the current ones continue, "
                               "newest first: trained_run_id, its parent run, and so on")
    created_at: float
    updated_at: float
    problem: str | None = Field(None, description="why the model cannot be used now (e.g. its folder is a symbolic "
                                                  "link, which the server does not follow); null when it can")


class Preset(BaseModel):
    name: str
    family: str
    size: str
    parameters: int
    config: dict[str, Any]


class RunCreate(BaseModel):
    """Hyper-parameters left out get sensible defaults scaled to max_steps (warm-up 10%, ~10 evaluations,
    ~5 checkpoints); every TrainConfig field is accepted."""
    model_config = ConfigDict(extra="forbid")
    model: str = Field(..., min_length=1, max_length=100)
    books: list[str] = Field(..., min_length=1, max_length=100)
    init_from_trained: bool = Field(False, description="continue from the model's trained weights")
    new_version: bool = Field(False, description="train a model that has trained weights from scratch anyway: "
                                                 "a new version; the earlier ones stay with their runs")
    max_steps: int = Field(200, ge=1, le=10_000_000)
    batch_size: int = Field(16, ge=1, le=4096)
    lr: float = Field(3e-4, gt=0, le=10)
    min_lr: float | None = Field(None, ge=0, le=10)
    warmup_steps: int | None = Field(None, ge=0, le=10_000_000)
    schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    decay_fraction: float | None = Field(None, gt=0, le=1, description="wsd: share of the steps spent decaying")
    weight_decay: float = Field(0.1, ge=0, le=10)
    grad_clip: float = Field(1.0, ge=0, le=1000)
    grad_accum_steps: int = Field(1, ge=1, le=1024)
    seq_len: int | None = Field(None, ge=2, le=32768)
    eval_every: int | None = Field(None, ge=0, le=10_000_000)
    eval_batches: int = Field(10, ge=1, le=1000)
    save_every: int | None = Field(None, ge=0, le=10_000_000)
    log_every: int | None = Field(None, ge=1, le=100_000)
    keep_last: int = Field(3, ge=0, le=100)
    early_stopping_patience: int = Field(0, ge=0, le=1000)
    time_budget_s: float | None = Field(None, gt=0, le=30 * 86400)
    seed: int = Field(1337, ge=0, le=2**31 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    val_fraction: float | None = Field(None, gt=0, lt=1)
    sample_every: int | None = Field(None, ge=0, le=10_000_000,
                                     description="generations into samples.jsonl every N steps (default: at each "
                                                 "evaluation; 0: never)")
    sample_tokens: int | None = Field(None, ge=1, le=1024, description="tokens per sample (48)")
    drift_every: int | None = Field(None, ge=0, le=10_000_000,
                                    description="record every token's embedding drift from step 0 every N steps "
                                                "(drift.json: the Data view's drift card); 0 or none: off")


class SelfPlayCreate(BaseModel):
    """Text self-play (`lmlab selfplay text`): sample groups of completions from a trained model, score them
    with a reward, update with group-relative advantages and a KL penalty to the starting model. The final
    policy becomes the new model `new_model`; the starting model is left as it was."""
    # the defaults are those of `lmlab selfplay text` (TextSelfPlayConfig), their one home
    model_config = ConfigDict(extra="forbid")
    model: str = Field(..., min_length=1, max_length=100, description="a trained model of the workspace")
    new_model: str = Field(..., min_length=1, max_length=100,
                           description="name of the model the improved policy is saved as; must not exist")
    reward: str = Field(TextSelfPlayConfig.reward, max_length=40,
                        description="seed (diversity and length), repetition (distinct 3-grams) or perplexity "
                                    "(log-probability under `judge`). `file` is CLI-only: the server does not "
                                    "execute user Python code", examples=list(SERVER_REWARDS))
    judge: str | None = Field(None, min_length=1, max_length=100,
                              description="reward perplexity: the trained model of the workspace that scores")
    prompts: list[Annotated[str, Field(max_length=2000)]] = Field(
        default_factory=list, max_length=64, description="completions start from these; none: from <BOS>")
    iterations: int = Field(TextSelfPlayConfig.iterations, ge=1, le=100_000, description="policy updates")
    group_size: int = Field(TextSelfPlayConfig.group_size, ge=2, le=256, description="completions per prompt")
    prompts_per_iteration: int = Field(TextSelfPlayConfig.prompts_per_iteration, ge=1, le=256)
    max_new_tokens: int = Field(TextSelfPlayConfig.max_new_tokens, ge=1, le=2048, description="tokens per completion")
    lr: float = Field(TextSelfPlayConfig.lr, gt=0, le=1, description="AdamW learning rate")
    kl_coef: float = Field(TextSelfPlayConfig.kl_coef, ge=0, le=100,
                           description="weight of the KL penalty to the starting model")
    temperature: float = Field(TextSelfPlayConfig.temperature, gt=0, le=10, description="sampling temperature")
    seed: int = Field(TextSelfPlayConfig.seed, ge=0, le=2**31 - 1)
    save_every: int = Field(TextSelfPlayConfig.save_every, ge=0, le=100_000,
                            description="checkpoint every N iterations (0: only at the end; a cancel always "
                                        "checkpoints), so that a stopped run can be resumed")


class ExperimentCreate(BaseModel):
    """A lab experiment, run as its own CLI command into the run directory, which then holds results.json,
    PNG plots and report.html (GET /runs/{id}/report). It makes no model and keeps no checkpoints."""
    model_config = ConfigDict(extra="forbid")
    lab: Literal["facts", "azr"] = Field(description="facts: knowledge acquisition on synthetic biographies "
                                         "(`lmlab lab facts EXPERIMENT`); azr: the Absolute Zero miniature "
                                         "(`lmlab selfplay azr`)")
    experiment: str | None = Field(None, max_length=40, validate_default=True,
                                   description="lab facts: one of " + ", ".join(FACTS_EXPERIMENTS) +
                                               "; lab azr has one experiment and takes none",
                                   examples=list(FACTS_EXPERIMENTS))
    quick: bool = Field(False, description="the lab's --quick: reduced sizes (facts: minutes; azr: a smoke run in "
                                           "seconds whose numbers mean nothing)")
    seeds: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] = Field(
        [0, 1, 2], min_length=1, max_length=MAX_SEEDS, description=f"distinct seeds, at most {MAX_SEEDS}")
    workers: int | None = Field(None, ge=1, le=os.cpu_count() or 1,
                                description="parallel processes, 1 thread each (default: the lab's own)")

    @field_validator("experiment")
    @classmethod
    def _experiment(cls, value: str | None, info: ValidationInfo) -> str | None:
        lab = info.data.get("lab")
        if lab == "facts" and value not in FACTS_EXPERIMENTS:
            raise ValueError(f"experiment ({value!r}) must be one of {', '.join(FACTS_EXPERIMENTS)} for lab facts")
        if lab == "azr" and value not in (None, "azr"):
            raise ValueError(f"lab azr has one experiment; leave experiment ({value!r}) out")
        return "azr" if lab == "azr" else value

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError(f"seeds ({value}) must be distinct")
        return value


MAX_EVAL_MODELS, MAX_EVAL_TASKS = 8, 20


class EvalCreate(BaseModel):
    """An evaluation, run as its own CLI command into the run directory: models on tasks (one model: `lmlab
    eval`; several: `lmlab compare`, the first the baseline), or every checkpoint of a training run (`lmlab
    eval RUN --all-checkpoints`). It makes no model and keeps no checkpoints; GET /runs/{id}/eval reads it."""
    model_config = ConfigDict(extra="forbid")
    models: list[Annotated[str, Field(min_length=1, max_length=100)]] = Field(
        [], max_length=MAX_EVAL_MODELS, description="trained models of the workspace; the first is the baseline of "
                                                    "the comparison")
    run: int | None = Field(None, ge=1, le=2**62, description="instead of models: a training run whose checkpoints "
                                                              "are scored, metric against step")
    tasks: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        ..., min_length=1, max_length=MAX_EVAL_TASKS, description="ids of GET /eval/tasks")


class EvalTask(BaseModel):
    id: str = Field(description="what EvalCreate.tasks takes: a shipped task's name, or tasks/FILE.yaml of the "
                                "workspace")
    name: str
    kind: str = Field(description="multiple_choice, lm or generate (empty for a task file that does not load)")
    items: int
    source: Literal["shipped", "workspace"]
    problem: str | None = Field(None, description="why a workspace task file cannot be used, in one line")


class EvalResults(BaseModel):
    run: Run
    models: list[str]
    tasks: list[str]
    trajectory_of: int | None = Field(description="the training run whose checkpoints were scored")
    results: list[dict[str, Any]] = Field(description="per model: {model, tasks: [{task, kind, n, metrics: {name: "
                                                      "{value, low, high}}}]}: the mean over items and its 95% "
                                                      "bootstrap interval (null for corpus-level metrics)")
    comparison: dict[str, Any] | None = Field(description="several models: lmlab.eval.compare's {base, models, "
                                                          "rows: [{task, metric, model, base, value, delta, low, "
                                                          "high}], flips: [{task, item, model, metric, from, to}]}")
    trajectory: list[dict[str, Any]] | None = Field(description="a run's checkpoints: [{step, task, metric, value}]")
    report: bool = Field(description="a comparison's report.html is served at GET /runs/{id}/report")


class ResumeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_steps: int | None = Field(None, ge=1, le=10_000_000, description="train further than first planned (for "
                                  "a self-play run: its iterations)")


class Run(BaseModel):
    id: int
    kind: Literal["train", "selfplay", "experiment", "eval", "quantize", "merge", "tune"] = Field(
        description="train: `lmlab train`; selfplay: `lmlab selfplay text` from `model` into params.new_model; "
                    "tune: `lmlab tune METHOD` (params.method: sft, dpo, grpo, distill) from `model` into "
                    "params.new_model; "
                    "experiment: a lab experiment (params.lab, params.experiment), no model (`model` is empty); "
                    "eval: an evaluation (params.models, params.tasks, params.run), no model (GET /runs/{id}/eval); "
                    "quantize: `lmlab quantize` of `model` into params.new_model; "
                    "merge: `lmlab merge` of `model` and params.others into params.new_model")
    model: str
    books: list[str]
    status: str
    params: dict[str, Any]
    init_from_trained: bool
    current_step: int
    max_steps: int | None
    progress: float | None
    tokens: int | None
    last_loss: float | None
    last_val_loss: float | None
    best_val_loss: float | None
    lr: float | None
    tokens_per_s: float | None
    last_reward: float | None = Field(description="self-play: mean reward of the latest iteration")
    last_kl: float | None = Field(description="self-play: KL to the starting model at the latest iteration")
    parent_run_id: int | None = Field(None, description="the run whose final weights this run started from")
    step_offset: int = Field(0, description="the model's steps before this run: its step s is step "
                                            "step_offset + s of the model (0 from scratch)")
    checkpoint_step: int | None
    can_resume: bool
    can_restart: bool = Field(False, description="stopped with nothing to resume from (before its first checkpoint, "
                                                 "or a kind that keeps none): POST .../restart starts it again")
    resumed_from_step: int | None
    launches: int
    cancel_requested: bool
    pid: int | None
    exit_code: int | None
    error: str | None
    stop_reason: str | None
    metrics_epoch: int
    queue_position: int | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    updated_at: float
    phase: str | None = Field(None, description="a running run: starting, tokenizer, data, training, evaluating "
                                                "or saving (training's RUN_DIR/phase.json); running (an experiment)")
    elapsed_s: float | None = Field(None, description="seconds since the run's process started (to its end)")
    eta_s: float | None = Field(None, description="a running run: seconds left at its pace so far")
    tokens_per_s_mean: float | None = Field(None, description="training: tokens / seconds since training began "
                                                              "(evaluations and checkpoints included), over the whole "
                                                              "run; tokens_per_s is the latest window's")


class RunOverview(BaseModel):
    """Everything the run page shows besides the metrics stream."""
    run: Run
    config: dict[str, Any] | None = Field(description="training: RUN_DIR/config.json (train, model, data stats)")
    samples: list[dict[str, Any]] = Field(description="training: RUN_DIR/samples.jsonl, the latest lines: "
                                                      "{step, samples: [{prompt, text}]}")
    completions: list[dict[str, Any]] = Field(description="self-play: a sampled completion per iteration with its "
                                                          "reward: {step, reward, kl, sample}")
    log_tail: list[str] = Field(description="the last lines of the process's output (an experiment's progress)")
    command: str | None = Field(description="the `lmlab ...` command line that makes this run again (into "
                                            "./run-N-again)")
    clone: dict[str, Any] | None = Field(description="training: a POST /runs body with this run's settings")
    trainings: dict[str, int] | None = Field(description="an experiment: its model trainings so far, started and "
                                                          "finished (each a run folder of its own inside this run's)")
    load: dict[str, Any] = Field(description="the machine: load_1m, cpus, memory_total_bytes, "
                                             "memory_available_bytes, process_rss_bytes (the run's process)")


class MetricsPage(BaseModel):
    run_id: int
    metrics_epoch: int
    step_offset: int = Field(0, description="add to each step for the model's step count (Run.step_offset)")
    status: str
    metrics: list[dict[str, Any]]


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(..., min_length=1, max_length=100)
    prompt: str = Field("", max_length=20000)
    max_new_tokens: int = Field(100, ge=1, le=2048)
    do_sample: bool = True
    temperature: float = Field(0.8, ge=0, le=10)
    top_k: int = Field(40, ge=0, le=1_000_000)
    top_p: float = Field(1.0, gt=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    num_beams: int = Field(1, ge=1, le=16)
    length_penalty: float = Field(1.0, ge=-10, le=10)
    stop_strings: list[str] = Field(default_factory=list, max_length=16)
    stop_at_eos: bool = True
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    run: int | None = Field(None, ge=1, le=2**62, description="a version: this run's final model, or with "
                                                             "`step` its checkpoint (GET /models/NAME/versions)")
    step: int | None = Field(None, ge=0, le=2**62, description="with `run`: the checkpoint at this step")
    steer: str | None = Field(None, min_length=1, max_length=100, description="a steering direction of the model "
                              "(GET /models/NAME/steering): added at its layer, or projected out with steer_ablate")
    steer_coef: float | None = Field(None, ge=-MAX_COEF, le=MAX_COEF,
                                     description="with `steer`: the coefficient (default 1)")
    steer_ablate: bool = Field(False, description="with `steer`: project the direction out of every layer instead")
    # test-time compute (models/ttc.py, as lmlab generate --best-of | --vote | --beam): one of the three
    best_of: int | None = Field(None, ge=1, le=64, description="N samples (seeds seed .. seed+N-1; 0 .. N-1 without "
                                "a seed), the one `verifier` scores highest (default: the model's mean log-prob)")
    vote: int | None = Field(None, ge=1, le=64, description="N samples, majority vote over the answers the "
                             "`verifier` task extracts (self-consistency)")
    beam: int | None = Field(None, ge=1, le=16, description="step-wise beam search of this width, scored by "
                             "`verifier` or the mean log-prob; deterministic: the sampling fields are not used")
    verifier: str | None = Field(None, max_length=40, description="a post-training task (addition, count, sort, "
                                 "format: the prompt then starts a text, BOS first) or logprob")
    step_tokens: int | None = Field(None, ge=1, le=64, description="beam: tokens per step (4)")


class SteeringDirection(BaseModel):
    """A steering direction saved with a model (models/NAME/steering/DIR, written by lmlab lab interp steer)."""
    name: str
    layer: int = Field(description="the residual stream: 0 the embeddings, i the output of block i-1")
    n_embd: int
    norm: float
    method: str | None = None


class Version(BaseModel):
    """A model's weights as one run left them: its final model or one of its checkpoints."""
    run: int
    kind: Literal["train", "selfplay", "tune"]
    step: int | None = Field(description="the checkpoint's step in its run; null for the run's final model")
    steps: int = Field(description="the model's steps at this version: the run's step_offset + its steps")
    current: bool = Field(description="the weights the model has now (its final model of trained_run_id)")
    created_at: float


class Generation(BaseModel):
    model: str
    prompt: str
    text: str
    new_tokens: int = Field(description="tokens generated (with test-time compute: by every sample or beam)")
    elapsed_s: float
    tokens_per_s: float
    # with best_of, vote or beam: what was compared and how each scored
    strategy: str | None = None
    candidates: list[str] | None = None
    scores: list[float | None] | None = Field(None, description="each candidate's score (reward, mean log-prob, "
                                               "or its answer's votes)")
    answer: str | None = Field(None, description="vote: the winning answer")
    votes: dict[str, int] | None = None
    summary: str | None = None



# ---- a model's page: quantization as a job, the model card (routers/modelpage.py) ----

class ChatTurn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str = Field(..., max_length=100_000)


class ChatFit(BaseModel):
    """A conversation for the Chat view, before it is sent to /v1/chat/completions: which of its oldest rounds no
    longer fit in the model's context (`lmlab chat` leaves them out the same way)."""
    model_config = ConfigDict(extra="forbid")
    model: str = Field(..., min_length=1, max_length=100, description="a workspace model with lmlab's chat template")
    messages: list[ChatTurn] = Field(..., min_length=1, max_length=1000)
    max_tokens: int | None = Field(None, ge=1, le=1_000_000,
                                   description="the reply's room (default: a quarter of the context)")


class QuantizeCreate(BaseModel):
    """`lmlab quantize` of a trained model into a new model of the workspace; the model stays as it was."""
    model_config = ConfigDict(extra="forbid")
    model: str = Field(..., min_length=1, max_length=100, description="a trained model of the workspace")
    new_model: str = Field(..., min_length=1, max_length=100, description="name of the quantized model; must not exist")
    to: str = Field(..., max_length=10, description="int8 (one scale per output row) or int4 (a scale and a zero "
                                                    "per group of input columns)")
    group_size: int | None = Field(None, description="int4: input columns per group, 32, 64 or 128 (32)")
    method: str = Field("rtn", max_length=10, description="rtn (round to nearest) or gptq (error feedback on "
                                                          "calibration text)")
    calibration: list[str] = Field(default_factory=list, max_length=64,
                                   description="gptq: books of the workspace to calibrate on")
    keep_head: bool = Field(False, description="keep the output head (and a tied embedding) in fp32")


class MergeCreate(BaseModel):
    """`lmlab merge` of trained models of the workspace into a new model; the parents stay as they were."""
    model_config = ConfigDict(extra="forbid")
    model: str = Field(..., min_length=1, max_length=100, description="the first parent, a trained model")
    others: list[str] = Field(..., min_length=1, max_length=16, description="the other parent(s)")
    new_model: str = Field(..., min_length=1, max_length=100, description="name of the merged model; must not exist")
    method: str = Field(..., max_length=20, description="linear, slerp, task-arithmetic, ties or dare")
    base: str | None = Field(None, max_length=100, description="task-arithmetic/ties/dare: the common parent")
    weights: list[float] | None = Field(None, max_length=17, description="one per parent (equal by default)")
    t: float | None = Field(None, description="slerp: 0 gives `model`, 1 the other (0.5)")
    density: float | None = Field(None, description="ties/dare: the fraction of each delta kept (1)")
    lam: float | None = Field(None, alias="lambda", description="task-arithmetic/ties/dare: delta scale (1)")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="dare: the seed of the dropped entries (0)")


class Speed(BaseModel):
    """A measured greedy decode on the server: batch 1 from <BOS>, `new_tokens` tokens, after a short warm-up."""
    tokens_per_s: float
    new_tokens: int
    elapsed_s: float
    threads: int = Field(description="torch's intra-op threads in the server process")
    measured_at: float = Field(description="Unix time of the measurement")


class ModelCard(BaseModel):
    name: str
    trained: bool
    size_bytes: int = Field(description="the model directory's files on disk (not the speed the server measured)")
    parameters: int = Field(description="the model's parameters (a tied embedding counted once)")
    weights: str = Field(description="fp32, int8, or int4 gN (with rtn or gptq): the format of the linears")
    bits_per_weight: float | None = Field(description="bits of every tensor in model.safetensors (integers, their "
                                                     "scales and zeros, what stays fp32) per parameter")
    quantized_bits_per_weight: float | None = Field(description="the quantized linears alone: their integers with "
                                                               "their scales and zeros, per weight")
    made: dict[str, Any] = Field(description="how it was made: {how: untrained|trained|tuned|selfplay|quantized|"
                                             "merged, from: the model(s) it came from, ...}")
    chat: bool = Field(description="it has lmlab's chat template (chat_template.jinja): the Chat view offers it")
    speed: Speed | None = Field(description="the last measurement of these weights (POST .../speed); null until one")
# ---- fine-tuning (routers/tune.py) -------------------------------------------------------------------

DATASET_KINDS = ("conversations", "prompt_completion", "pairs", "kto")


class Dataset(BaseModel):
    name: str
    kind: str = Field(description="conversations, prompt_completion, pairs or kto (empty for a file whose "
                                  "record is missing)")
    examples: int
    size: int
    created_at: float | None = None
    problem: str | None = None


class PreviewToken(BaseModel):
    text: str
    trained: bool = Field(description="the token is a training target (its loss counts)")


class PreviewRow(BaseModel):
    line: int
    side: str = Field(description="'' for a conversation or prompt-completion pair; chosen, rejected or "
                                  "completion (kto) for preference data")
    tokens: list[PreviewToken]
    ids: list[int]
    mask: list[int]
    truncated: bool


class DatasetPreview(BaseModel):
    name: str
    kind: str
    model: str
    examples: int
    context: int = Field(description="tokens per example the model trains on (its block_size + 1 for SFT)")
    counted: int = Field(description="the first examples that supervised_tokens and truncated count (all of a "
                         "dataset of up to 2000)")
    supervised_tokens: int = Field(description="trained tokens of the counted examples, after truncation")
    truncated: int = Field(description="counted examples cut to the context")
    added_tokens: list[str] = Field(description="chat tokens the model's tokenizer lacks; fine-tuning adds them")
    rows: list[PreviewRow]


class InterpRequest(BaseModel):
    """A view of a model on a prompt (lmlab lab interp): lens, attention, or patch (with a corrupted prompt of
    as many tokens)."""
    model_config = ConfigDict(extra="forbid")
    view: Literal["lens", "attention", "patch"]
    prompt: str = Field(..., min_length=1, max_length=2000, description="the prompt (patch: the clean one)")
    corrupt: str | None = Field(None, min_length=1, max_length=2000, description="patch: the corrupted prompt")
    target: str | None = Field(None, min_length=1, max_length=200, description="lens, patch: the token traced (its "
                               "first token; default the model's top token after the prompt)")
    foil: str | None = Field(None, min_length=1, max_length=200, description="patch: the token the target's logit "
                             "is compared with (default the corrupted run's top other token)")
    top_k: int = Field(5, ge=1, le=20, description="lens: tokens kept per stream and position")
    bos: bool = Field(False, description="start the prompts with <BOS> (models trained on texts that start with it)")


class SAEBrowse(BaseModel):
    """Feature cards of a saved sparse autoencoder over a book of the workspace."""
    model_config = ConfigDict(extra="forbid")
    book: str = Field(..., min_length=1, max_length=200, description="the book whose text the features are read on")
    features: list[int] | None = Field(None, min_length=1, max_length=50, description="the features shown (default: "
                                       "a seeded sample of those that fire on the book)")
    count: int = Field(12, ge=1, le=50, description="features in the default sample")
    tokens: int = Field(8192, ge=16, le=65536, description="the book's first tokens read")


class TuneCreate(BaseModel):
    """A fine-tuning run: `lmlab tune sft` on conversations or prompt-completion pairs, `lmlab tune dpo --loss L`
    on preference pairs (KTO: labelled completions), or `lmlab tune grpo --task T`, from a trained model into a
    new one, optionally with LoRA adapters. Settings of another method are refused."""
    model_config = ConfigDict(extra="forbid")
    method: Literal["sft", "dpo", "grpo", "distill"]
    model: str = Field(..., min_length=1, max_length=100, description="the trained model to start from (distill: "
                                                                      "the teacher)")
    new_model: str = Field(..., min_length=1, max_length=100, description="the name of the model it makes")
    dataset: str | None = Field(None, max_length=200, description="sft and dpo: a dataset of the workspace")
    loss: Literal["dpo", "ipo", "simpo", "orpo", "kto"] | None = Field(None, description="dpo (default dpo)")
    task: str | None = Field(None, max_length=40, description="grpo: a verifiable task")
    books: list[str] | None = Field(None, min_length=1, max_length=100, description="distill: books it trains on")
    preset: str | None = Field(None, max_length=40, description="distill: the new student's preset (the teacher's "
                                                                "tokenizer), e.g. gpt2-tiny")
    mode: Literal["logits", "sequence"] | None = Field(None, description="distill: logits (KL to the teacher's "
                                                       "softened predictions mixed with the data's loss) or sequence "
                                                       "(train on the teacher's continuations); default logits")
    temperature: float | None = Field(None, gt=0, le=100, description="distill, logits: the softmax temperature (2)")
    alpha: float | None = Field(None, ge=0, le=1, description="distill, logits: weight of the KD term (0.5)")
    max_steps: int = Field(50, ge=1, le=1_000_000, description="optimizer steps (grpo: updates)")
    batch_size: int | None = Field(None, ge=1, le=4096, description="sft, dpo: examples per step (8)")
    lr: float | None = Field(None, gt=0, le=1, description="learning rate (the method's default)")
    warmup_steps: int | None = Field(None, ge=0, le=1_000_000, description="sft, dpo: warm-up steps (0)")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    save_every: int = Field(10, ge=0, le=1_000_000, description="checkpoint every N steps (0: only at the end)")
    log_every: int | None = Field(None, ge=1, le=1_000_000, description="sft, dpo: a metrics line every N steps (1)")
    eval_every: int | None = Field(None, ge=0, le=1_000_000, description="sft: validation, grpo: held-out pass@1 "
                                                                        "every N steps (0: at the end)")
    packing: bool | None = Field(None, description="sft: lay short examples end to end")
    completion_only: bool | None = Field(None, description="sft on prompt-completion pairs: the completion only")
    beta: float | None = Field(None, gt=0, le=100, description="dpo: the loss's beta (ORPO: lambda)")
    sft_weight: float | None = Field(None, ge=0, le=100, description="dpo with loss dpo, ipo or simpo: add this weight "
                                     "x the chosen completions' NLL per token (DPO + NLL, RPO; 0)")
    prompts_per_step: int | None = Field(None, ge=1, le=1024, description="grpo: prompts per update (4)")
    group_size: int | None = Field(None, ge=2, le=256, description="grpo: completions per prompt (4)")
    max_new_tokens: int | None = Field(None, ge=1, le=4096, description="grpo: tokens per completion (16)")
    kl_coef: float | None = Field(None, ge=0, le=100, description="grpo: weight of the KL to the starting model")
    eval_prompts: int | None = Field(None, ge=1, le=100_000, description="grpo: held-out prompts for pass@1 (50)")
    lora_rank: int | None = Field(None, ge=1, le=1024, description="LoRA adapters of this rank (none: all weights)")
    lora_alpha: float | None = Field(None, gt=0, le=MAX_ALPHA,
                                     description="LoRA: scale alpha / rank (default 2 x rank)")
    lora_dropout: float | None = Field(None, ge=0, lt=1, description="LoRA: dropout on the adapters' input")
    lora_targets: str | None = Field(None, max_length=300,
                                     pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*(,[A-Za-z0-9_][A-Za-z0-9_.\-]*)*$",
                                     description="LoRA: comma list of module names, as the CLI's --lora-targets "
                                                 "(all-linear, c_attn, attn.c_attn; default all linear layers)")
    lora_new_tokens: bool | None = Field(None, description="LoRA: also train the embedding rows of the chat "
                                         "format's tokens and an untied head's row of <|end|> (PEFT's "
                                         "trainable_token_indices)")
    lora_hard_tokens: int | None = Field(None, ge=0, le=4096, description="sft with LoRA: also train the rows of the "
                                         "K tokens the model finds hardest on the training split")
