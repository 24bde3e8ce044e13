"""`lmlab tune dpo`: the DPO, IPO, SimPO, ORPO and KTO losses against the papers' formulas written out here and
against TRL's DPOTrainer on the HF export, exact resume, the reference cache, and bad data files."""

import json
import math

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file

from lmlab.cli import main
from lmlab.models import ModelConfig, Transformer
from lmlab.models.io import load_pretrained, save_pretrained
from lmlab.tokenizers import Tokenizer
from lmlab.train import Callback, TrainConfig
from lmlab.train.config import lr_at
from lmlab.tune import preference as P

TEXT = ("the cat sat on the mat. the dog sat on the log. кот сидел на ковре, а пёс лежал у дома. "
        "a bird flew over the tree and sang a song. ") * 20
PAIRS = [("the cat", " sat on the mat.", " ran away"), ("the dog sat", " on the log.", " on"),
         ("кот сидел", " на ковре.", " у дома, а пёс"), ("a bird", " flew over the tree.", " sang"),
         ("the fox", " ran into the wood.", " sat on the cat and the dog"), ("пёс", " лежал у дома.", " сидел")]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([TEXT], kind="bpe", vocab_size=320)


@pytest.fixture(scope="module")
def model_dir(tok, tmp_path_factory):
    """A tiny llama with dropout on (the preference step must switch it off) and weights moved off their init."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("llama-tiny", vocab_size=len(tok), block_size=48, dropout=0.1))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return save_pretrained(tmp_path_factory.mktemp("m") / "base", model.eval(), tok)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("d") / "pairs.jsonl",
                       [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS])


@pytest.fixture(scope="module")
def kto_file(tmp_path_factory):
    rows = [{"prompt": p, "completion": c if i % 3 else r, "label": bool(i % 3)} for i, (p, c, r) in enumerate(PAIRS)]
    return write_jsonl(tmp_path_factory.mktemp("d") / "kto.jsonl", rows)


# ---- the losses, written out from the papers --------------------------------------------------------

def logsig(x):
    return -math.log1p(math.exp(-x))


def paper(loss, beta, pc, pr, rc, rr, nc, nr, gamma=1.0):
    """One pair's loss from the summed log-probs (policy pc, pr; reference rc, rr) over nc, nr tokens."""
    if loss == "dpo":    # Rafailov et al. 2023, eq. 7
        return -logsig(beta * (pc - rc) - beta * (pr - rr))
    if loss == "ipo":    # Azar et al. 2023, eq. 17 on per-token log-ratios (TRL's IPO)
        return ((pc - rc) / nc - (pr - rr) / nr - 1 / (2 * beta)) ** 2
    if loss == "simpo":  # Meng et al. 2024, eq. 6
        return -logsig(beta / nc * pc - beta / nr * pr - gamma)
    # ORPO's odds-ratio term (Hong et al. 2024, eq. 7-8): P = exp(mean log-prob), odds = P / (1 - P)
    pw, pl = math.exp(pc / nc), math.exp(pr / nr)
    return -beta * logsig(math.log(pw / (1 - pw)) - math.log(pl / (1 - pl)))


def full_logps(model, ids, mask):
    """Summed completion log-probs by an independent route: log_softmax over the whole row, one token at a time."""
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.double(), -1)
    out = []
    for row in range(ids.shape[0]):
        out.append([float(logp[row, t - 1, ids[row, t]]) for t in range(1, ids.shape[1]) if mask[row, t]])
    return out


@pytest.mark.parametrize("loss", ["dpo", "ipo", "simpo", "orpo"])
def test_each_pair_loss_on_a_fixed_batch_is_the_papers_formula(loss, model_dir, pairs_file, tok, tmp_path):
    model, _ = load_pretrained(model_dir)
    ds = P.PreferenceData(pairs_file, tok, "pairs", 48)
    ref = Transformer(model.config).eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():  # the policy has moved away from the reference, so the log-ratios are not 0
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p, generator=torch.Generator().manual_seed(1)))
    ds.attach_reference(ref, None)
    cfg = P.PreferenceConfig(loss=loss, beta=0.7 if loss != "simpo" else 2.0,
                             **({"gamma": 0.3} if loss == "simpo" else {}))  # gamma is SimPO's alone
    batch = ds.sample_batch(6, 48, torch.Generator().manual_seed(0))
    got, metrics = P.PreferenceObjective(cfg).loss(P.no_dropout(model).train(), batch)
    got = got.detach()
    # tokens/s and MFU count both sides of the 6 pairs, padded to one length as the step runs them
    longest = max(batch["chosen"].shape[1], batch["rejected"].shape[1])
    assert P.PreferenceObjective(cfg).trained_tokens(batch) == 12 * longest
    model.eval()
    c, r = full_logps(model, batch["chosen"], batch["chosen_mask"]), full_logps(model, batch["rejected"],
                                                                                  batch["rejected_mask"])
    rc, rr = full_logps(ref, batch["chosen"], batch["chosen_mask"]), full_logps(ref, batch["rejected"],
                                                                                  batch["rejected_mask"])
    want = [paper(loss, cfg.beta, sum(a), sum(b), sum(x), sum(y), len(a), len(b), 0.3) for a, b, x, y in
            zip(c, r, rc, rr)]
    expected = sum(want) / len(want)
    if loss == "orpo":  # + the NLL of the chosen completions, per token over the batch
        expected -= sum(map(sum, c)) / sum(map(len, c))
    assert float(got) == pytest.approx(expected, abs=1e-5)
    reward = (lambda s, ref_s, n: cfg.beta * (s - ref_s)) if loss in ("dpo", "ipo") else \
        (lambda s, ref_s, n: cfg.beta * s / n)
    rw_c = [reward(sum(a), sum(x), len(a)) for a, x in zip(c, rc)]
    rw_r = [reward(sum(b), sum(y), len(b)) for b, y in zip(r, rr)]
    assert float(metrics["rewards_chosen"]) == pytest.approx(sum(rw_c) / 6, abs=1e-5)
    assert float(metrics["margin"]) == pytest.approx((sum(rw_c) - sum(rw_r)) / 6, abs=1e-5)
    assert float(metrics["accuracy"]) == pytest.approx(sum(a > b for a, b in zip(rw_c, rw_r)) / 6)
    assert float(metrics["logps_rejected"]) == pytest.approx(sum(map(sum, r)) / 6, abs=1e-5)
    # k3 on the chosen tokens: (e^d - 1) - d, d = log pi_ref - log pi
    d = [x_t - a_t for a, x in zip(c, rc) for a_t, x_t in zip(a, x)]
    assert float(metrics["kl"]) == pytest.approx(sum(math.expm1(v) - v for v in d) / len(d), abs=1e-6)


@pytest.mark.parametrize("mean_c, mean_r", [(-1e-6, -2e-6), (-5e-8, -1e-7), (-2e-8, -3e-8), (-0.5, -3.0),
                                            (-40.0, -41.0)])
def test_orpo_log_odds_stay_exact_for_a_confident_model(mean_c, mean_r):
    """ORPO's log odds need log(1 - P) with P = exp(mean log-prob); for a mean near 0 (a near-memorised
    completion), log1p(-exp(m)) in fp32 loses it (-2e-8 vs -3e-8 gave a loss of 0 instead of 0.511). Against the
    formula in float64 with log(-expm1(m)); the gradient stays finite."""
    cfg = P.PreferenceConfig(loss="orpo", beta=1.0)
    c = torch.tensor([mean_c * 10], requires_grad=True)
    r = torch.tensor([mean_r * 10])
    one = torch.ones(1)
    loss = P.pair_loss(cfg, c, r, one, one, one * 10, one * 10)[0]
    log_odds = (mean_c - math.log(-math.expm1(mean_c))) - (mean_r - math.log(-math.expm1(mean_r)))
    assert loss.item() == pytest.approx(math.log1p(math.exp(-log_odds)), rel=1e-5, abs=1e-12)
    loss.sum().backward()
    assert torch.isfinite(c.grad).all()


def test_the_kto_loss_is_the_papers_with_trls_kl_estimate(model_dir, kto_file, tok):
    model, _ = load_pretrained(model_dir)
    ds = P.PreferenceData(kto_file, tok, "kto", 48)
    ref = Transformer(model.config).eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p, generator=torch.Generator().manual_seed(2)))
    ds.attach_reference(ref, None)
    cfg = P.PreferenceConfig(loss="kto", beta=0.5, desirable_weight=1.0, undesirable_weight=1.5)
    batch = {k: v for k, v in ds.tensors.items()}  # all six rows, file order
    got, metrics = P.PreferenceObjective(cfg).loss(P.no_dropout(model).train(), batch)
    got = got.detach()
    model.eval()
    # the KL pairs: each prompt with the previous example's completion (cyclic), as TRL rotates them
    rows = [json.loads(line) for line in kto_file.read_text().splitlines()]
    for i, row in enumerate(rows):
        p, c = P.render(tok, row["prompt"], rows[i - 1]["completion"])
        assert batch["kl"][i][batch["kl_mask"][i]].tolist() == c
    pol = [sum(x) for x in full_logps(model, batch["completion"], batch["completion_mask"])]
    refs = [sum(x) for x in full_logps(ref, batch["completion"], batch["completion_mask"])]
    kl_pol = [sum(x) for x in full_logps(model, batch["kl"], batch["kl_mask"])]
    kl_ref = [sum(x) for x in full_logps(ref, batch["kl"], batch["kl_mask"])]
    z0 = max(0.0, sum(a - b for a, b in zip(kl_pol, kl_ref)) / 6)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    losses = [1.0 * (1 - sig(0.5 * (a - b - z0))) if row["label"] else 1.5 * (1 - sig(0.5 * (z0 - (a - b))))
              for a, b, row in zip(pol, refs, rows)]
    assert float(got) == pytest.approx(sum(losses) / 6, abs=1e-6)
    assert float(metrics["kto_z0"]) == pytest.approx(z0, abs=1e-6)
    right = [(a - b > 0) if row["label"] else (a - b < 0) for a, b, row in zip(pol, refs, rows)]
    assert float(metrics["accuracy"]) == pytest.approx(sum(right) / 6)
    # the reference itself: every reward is 0, right for no label (it counted every undesirable row right)
    _, at_start = P.PreferenceObjective(cfg).loss(ref, batch)
    assert float(at_start["accuracy"]) == 0.0 and float(at_start["margin"]) == 0.0


# ---- against TRL ------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss,trl_type,sft_weight", [("dpo", "sigmoid", 0.0), ("ipo", "ipo", 0.0),
                                                     ("dpo", "sigmoid", 0.7)])
def test_the_first_step_loss_equals_trls_dpo_trainer_on_the_hf_export(loss, trl_type, sft_weight, model_dir,
                                                                     pairs_file, tok, tmp_path, monkeypatch):
    """TRL's DPOTrainer on the transformers export of the same weights, fed the same token ids (its own text
    tokenisation would append the EOS token's text, which lmlab's tokenizer splits as text): the loss of its
    first step equals ours. sft_weight: DPO + NLL (RPO), TRL's loss_type ["sigmoid", "sft"] with loss_weights
    [1, w]."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from lmlab.interop import to_hf_model, to_hf_tokenizer

    ref, _ = load_pretrained(model_dir)
    model, _ = load_pretrained(model_dir)
    with torch.no_grad():  # a policy that has moved from the reference: at the reference DPO's loss is log 2
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p, generator=torch.Generator().manual_seed(3)))
    ds = P.PreferenceData(pairs_file, tok, "pairs", 48)
    ds.attach_reference(ref, None)
    cfg = P.PreferenceConfig(loss=loss, beta=0.3, sft_weight=sft_weight)
    batch = {k: v for k, v in ds.tensors.items()}
    ours = P.PreferenceObjective(cfg).loss(P.no_dropout(model).train(), batch)[0].detach()
    assert float(ours) != pytest.approx(math.log(2) if loss == "dpo" else (1 / 0.6) ** 2, abs=1e-2)
    if sft_weight:  # the NLL term is far above the tolerance: without it the losses differ
        plain = P.PreferenceObjective(P.PreferenceConfig(loss=loss, beta=0.3)).loss(model, batch)[0].detach()
        assert float(ours - plain) > 1.0

    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    ids = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for r in rows:
        p, c = P.render(tok, r["prompt"], r["chosen"])
        p2, rj = P.render(tok, r["prompt"], r["rejected"])
        assert p == p2  # one prompt for both sides: TRL's layout
        ids["prompt_ids"].append(p)
        ids["chosen_ids"].append(c)
        ids["rejected_ids"].append(rj)
    monkeypatch.setattr(trl.DPOTrainer, "_prepare_dataset", lambda self, dataset, *a, **k: dataset)
    # fp32 (TRL's configs default to bf16 autocast, which its reference model then runs under); eval mode: TRL's
    # disable_dropout zeroes nn.Dropout modules but not the float attention_dropout of
    # transformers' Llama attention, which our export sets from the model's dropout
    hf, ref_hf = to_hf_model(model), to_hf_model(ref)
    types = dict(loss_type=[trl_type, "sft"], loss_weights=[1.0, sft_weight]) if sft_weight else dict(
        loss_type=[trl_type])
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), **types, beta=0.3, bf16=False, report_to=[],
                         per_device_train_batch_size=len(rows), max_steps=1, learning_rate=0.0, logging_steps=1,
                         remove_unused_columns=False, use_cpu=True, max_length=None, save_strategy="no")
    trainer = trl.DPOTrainer(model=hf, ref_model=ref_hf, args=args, train_dataset=datasets.Dataset.from_dict(ids),
                             processing_class=to_hf_tokenizer(tok))
    inputs = trainer.data_collator([{k: v[i] for k, v in ids.items()} for i in range(len(rows))])
    assert inputs["input_ids"][:6, :batch["chosen"].shape[1]].tolist() == batch["chosen"].tolist()  # same ids
    theirs = trainer.compute_loss(trainer.model.eval(), inputs).detach()
    assert float(ours) == pytest.approx(float(theirs), abs=1e-4)


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_simpo_and_orpo_equal_trls_cpo_and_orpo_trainers_on_the_hf_export(loss, model_dir, pairs_file, tok, tmp_path,
                                                                         monkeypatch):
    """The reference-free losses against TRL's experimental CPOTrainer (loss_type="simpo", no NLL term) and
    ORPOTrainer (its odds-ratio term), their rows tokenised by our render (their tokenize_row adds specials)."""
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from lmlab.interop import to_hf_model, to_hf_tokenizer

    model, _ = load_pretrained(model_dir)
    ds = P.PreferenceData(pairs_file, tok, "pairs", 48)
    ds.attach_reference(model, None)
    cfg = P.PreferenceConfig(loss=loss, beta=2.0 if loss == "simpo" else 0.3,
                             **({"gamma": 0.8} if loss == "simpo" else {}))
    ours = P.PreferenceObjective(cfg).loss(P.no_dropout(model).train(), dict(ds.tensors))[0].detach()

    def tokenize_row(self, feature, model=None):
        row = {}
        for side in ("chosen", "rejected"):
            p, c = P.render(tok, feature["prompt"], feature[side])
            row.update({f"{side}_input_ids": p + c, f"{side}_attention_mask": [1] * (len(p) + len(c)),
                        f"{side}_labels": [-100] * len(p) + c})
        return {**row, "prompt_input_ids": p, "prompt_attention_mask": [1] * len(p)}

    common = dict(output_dir=str(tmp_path / "trl"), bf16=False, report_to=[], per_device_train_batch_size=6,
                  max_steps=1, learning_rate=0.0, remove_unused_columns=False, use_cpu=True, save_strategy="no",
                  max_length=48)
    if loss == "simpo":
        trainer_cls, args = CPOTrainer, CPOConfig(loss_type="simpo", beta=2.0, simpo_gamma=0.8, cpo_alpha=0.0,
                                                  **common)
    else:
        trainer_cls, args = ORPOTrainer, ORPOConfig(beta=0.3, **common)
    monkeypatch.setattr(trainer_cls, "tokenize_row", tokenize_row)
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    data = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    trainer = trainer_cls(model=to_hf_model(model), args=args, train_dataset=data,
                          processing_class=to_hf_tokenizer(tok))
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    theirs, metrics = trainer.get_batch_loss_metrics(trainer.model.eval(), inputs, "train")
    if loss == "orpo":  # TRL's NLL term counts the prompt's tokens too; the paper's (and ours) the completion's
        chosen = full_logps(model.eval(), ds.tensors["chosen"], ds.tensors["chosen_mask"])
        ours, theirs = ours + sum(map(sum, chosen)) / sum(map(len, chosen)), theirs - metrics["nll_loss"]
    assert float(ours) == pytest.approx(float(theirs), abs=1e-4)


def test_the_kto_loss_equals_trls_kto_trainer_on_the_hf_export(model_dir, kto_file, tok, tmp_path, monkeypatch):
    """TRL's KTOTrainer with one batch of the whole file in order: its KL pairs (completions rotated by one
    within the batch) are ours, and so is its first-step loss."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from lmlab.interop import to_hf_model, to_hf_tokenizer

    ref, _ = load_pretrained(model_dir)
    model, _ = load_pretrained(model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p, generator=torch.Generator().manual_seed(4)))
    ds = P.PreferenceData(kto_file, tok, "kto", 48)
    ds.attach_reference(ref, None)
    cfg = P.PreferenceConfig(loss="kto", beta=0.3, undesirable_weight=1.5)
    ours = P.PreferenceObjective(cfg).loss(P.no_dropout(model).train(), dict(ds.tensors))[0].detach()

    rows = [json.loads(line) for line in kto_file.read_text().splitlines()]
    ids = {"prompt_ids": [], "completion_ids": [], "KL_completion_ids": [], "label": []}
    for r in rows:
        p, c = P.render(tok, r["prompt"], r["completion"])
        ids["prompt_ids"].append(p)
        ids["completion_ids"].append(c)
        ids["label"].append(r["label"])
    ids["KL_completion_ids"] = ids["completion_ids"][-1:] + ids["completion_ids"][:-1]  # TRL's rotation
    monkeypatch.setattr(trl.KTOTrainer, "_prepare_dataset", lambda self, dataset, *a, **k: dataset)
    args = trl.KTOConfig(output_dir=str(tmp_path / "trl"), beta=0.3, undesirable_weight=1.5, bf16=False,
                         report_to=[], per_device_train_batch_size=len(rows), max_steps=1, learning_rate=0.0,
                         remove_unused_columns=False, use_cpu=True, max_length=None, save_strategy="no")
    trainer = trl.KTOTrainer(model=to_hf_model(model), ref_model=to_hf_model(ref), args=args,
                             train_dataset=datasets.Dataset.from_dict(ids), processing_class=to_hf_tokenizer(tok))
    inputs = trainer.data_collator([{k: v[i] for k, v in ids.items()} for i in range(len(rows))])
    theirs = trainer.compute_loss(trainer.model.eval(), inputs).detach()
    assert float(ours) == pytest.approx(float(theirs), abs=1e-4)


# ---- runs: resume, cache, CLI -------------------------------------------------------------------------

class StopAt(Callback):
    def __init__(self, k=None):
        self.k, self.rows = k, []

    def on_step(self, trainer, metrics):
        self.rows.append({k: v for k, v in metrics.items() if k not in ("elapsed_s", "tokens_per_s", "mfu")})
        if trainer.step == self.k:
            trainer.should_stop = True


def config(**kw):
    return TrainConfig(**{**dict(max_steps=8, batch_size=4, grad_accum_steps=2, warmup_steps=2, lr=3e-3,
                                 log_every=1, eval_every=0, save_every=0, seed=5, device="cpu"), **kw})


def test_a_dpo_run_resumes_exactly(model_dir, pairs_file, tmp_path):
    cfg = P.PreferenceConfig(loss="dpo", beta=0.5)
    full = StopAt()
    P.run_preference(tmp_path / "full", config(), model_dir=model_dir, data=pairs_file, cfg=cfg,
                     cache_dir=tmp_path / "cache", callbacks=[full], say=lambda s: None)
    first, second = StopAt(3), StopAt()
    mine = tmp_path / "mine.jsonl"  # the user's file, changed before the resume: the run reads its own copy
    mine.write_bytes(pairs_file.read_bytes())
    P.run_preference(tmp_path / "cut", config(), model_dir=model_dir, data=mine, cfg=cfg,
                     cache_dir=tmp_path / "cache", callbacks=[first], say=lambda s: None)
    swapped = [json.loads(x) for x in mine.read_text().splitlines()]
    mine.write_text("".join(json.dumps({**r, "chosen": r["rejected"], "rejected": r["chosen"]}) + "\n"
                            for r in swapped))
    P.run_preference(tmp_path / "cut", resume=True, callbacks=[second], say=lambda s: None)
    rows = first.rows + second.rows
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert full.rows[-1]["margin"] != 0 and full.rows[0]["kl"] == 0  # it learned; step 1 is at the reference
    for a, b in zip(rows, full.rows):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], abs=1e-6, nan_ok=True), k
    a, _ = load_pretrained(tmp_path / "full" / "final")
    b, _ = load_pretrained(tmp_path / "cut" / "final")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0, msg=name)


def test_a_dpo_run_will_not_resume_on_other_starting_weights(model_dir, pairs_file, tmp_path):
    """The starting model is the run's reference: other weights there since (a retrained model of the same name)
    would make the resumed run another one. It resumed on them without a word."""
    import shutil
    start = tmp_path / "start"
    shutil.copytree(model_dir, start)
    P.run_preference(tmp_path / "cut", config(), model_dir=start, data=pairs_file, cfg=P.PreferenceConfig("dpo"),
                     callbacks=[StopAt(3)], say=lambda s: None)
    model, tok = load_pretrained(start)
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    save_pretrained(start, model, tok)
    with pytest.raises(ValueError, match="the weights of .* differ from those the run started from"):
        P.run_preference(tmp_path / "cut", resume=True, say=lambda s: None)


@pytest.mark.parametrize("loss", P.LOSSES)
def test_a_lora_run_trains_adapters_on_the_base_as_its_reference_and_resumes_exactly(loss, model_dir, pairs_file,
                                                                                     kto_file, tmp_path):
    """Every loss with --lora-rank: the base's weights bit for bit the same after the run (AdamW with weight decay
    saw only the adapters), the cached reference log-probabilities those of the base (no second model), a run
    stopped at step 3 and resumed gives the uninterrupted run's rows, and `peft` reads RUN/adapter on the HF
    export with lmlab's logits."""
    from test_lora import assert_peft_agrees

    from lmlab.tune.lora import LoRAConfig, load_adapter
    cfg, lora = P.PreferenceConfig(loss=loss), LoRAConfig(rank=4, dropout=0.1)
    data = kto_file if loss == "kto" else pairs_file
    run = dict(model_dir=model_dir, data=data, cfg=cfg, cache_dir=tmp_path / "cache", say=lambda s: None, lora=lora)
    full, first, second = StopAt(), StopAt(3), StopAt()
    P.run_preference(tmp_path / "full", config(save_every=4), callbacks=[full], **run)
    P.run_preference(tmp_path / "cut", config(), callbacks=[first], **run)
    P.run_preference(tmp_path / "cut", resume=True, callbacks=[second], say=lambda s: None)
    rows = first.rows + second.rows
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert full.rows[0]["kl"] == 0 and full.rows[-1]["kl"] > 0  # step 1 is at the reference, then it moves
    for a, b in zip(rows, full.rows):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], abs=1e-6, nan_ok=True), k
    base = load_file(model_dir / "model.safetensors")
    saved = load_file(tmp_path / "full" / "checkpoints" / "step-8" / "model.safetensors")
    assert {k for k in saved if "lora_" not in k} == set(base) and any("lora_B" in k for k in saved)
    for name, weight in base.items():
        assert torch.equal(saved[name], weight), name
    # the reference: the base model's log-probabilities (dropout off), as a run without LoRA caches them
    plain, tok = load_pretrained(model_dir)
    ds = P.PreferenceData(data, tok, cfg.kind, 48)
    assert ds.attach_reference(P.no_dropout(plain), tmp_path / "cache")  # the LoRA run's cache entry: found
    for side in ds.sides:
        torch.testing.assert_close(ds.tensors["ref_" + side], P.token_logps(
            plain, ds.tensors[side], ds.tensors[side + "_mask"], grad=False), atol=0, rtol=0)
    # RUN/adapter (PEFT's layout) on the base = RUN/final (merged), the same for the resumed run; peft agrees
    adapted = load_adapter(load_pretrained(model_dir)[0], tmp_path / "full" / "adapter")
    x = torch.randint(0, len(tok), (2, 24))
    with torch.no_grad():
        for run_dir in ("full", "cut"):
            torch.testing.assert_close(load_pretrained(tmp_path / run_dir / "final")[0].eval()(x).logits,
                                       adapted.eval()(x).logits, atol=1e-5, rtol=0)
    assert_peft_agrees(model_dir, tmp_path / "full" / "adapter", adapted, tmp_path / "hf")


def test_the_reference_cache_is_reused_and_invalidated(model_dir, pairs_file, tok, tmp_path, monkeypatch):
    model, _ = load_pretrained(model_dir)
    calls = []
    real = P.token_logps

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(P, "token_logps", counting)
    fresh = P.PreferenceData(pairs_file, tok, "pairs", 48)
    assert not fresh.attach_reference(model, tmp_path)
    n = len(calls)
    assert n > 0 and len(list(tmp_path.glob("*.safetensors"))) == 1
    again = P.PreferenceData(pairs_file, tok, "pairs", 48)
    assert again.attach_reference(model, tmp_path) and len(calls) == n  # read, not recomputed
    for side in ("ref_chosen", "ref_rejected"):
        assert torch.equal(again.tensors[side], fresh.tensors[side])
    # a damaged cache file (cut short; another file's tensors) is computed again and written anew: it crashed
    cache = next(tmp_path.glob("*.safetensors"))
    whole = cache.read_bytes()
    for damaged in (whole[:len(whole) // 2], safetensors.torch.save({"ref_chosen": torch.zeros(2, 3)})):
        cache.write_bytes(damaged)
        redone = P.PreferenceData(pairs_file, tok, "pairs", 48)
        assert not redone.attach_reference(model, tmp_path) and cache.read_bytes() == whole
        assert all(torch.equal(redone.tensors[s], fresh.tensors[s]) for s in ("ref_chosen", "ref_rejected"))
    n = len(calls)
    with torch.no_grad():  # other weights: recomputed
        model.lm_head.weight[0, 0] += 1e-3
    assert not P.PreferenceData(pairs_file, tok, "pairs", 48).attach_reference(model, tmp_path)
    changed = write_jsonl(tmp_path / "other.jsonl", [{"prompt": p, "chosen": c, "rejected": r + "!"}
                                                     for p, c, r in PAIRS])
    assert not P.PreferenceData(changed, tok, "pairs", 48).attach_reference(model, tmp_path)  # other data
    assert not P.PreferenceData(pairs_file, tok, "pairs", 20).attach_reference(model, tmp_path)  # cut: other ids
    assert len(list(tmp_path.glob("*.safetensors"))) == 4


BAD = [('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"\n', "pairs.jsonl:2: not JSON"),
       ('{"prompt": "a", "chosen": "b"}\n', "pairs.jsonl:1: missing field 'rejected'"),
       ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n{"prompt": "a", "chosen": "x", "rejected": "x"}\n',
        "pairs.jsonl:3: chosen and rejected are the same text"),
       ('{"prompt": "", "chosen": "b", "rejected": "c"}\n', "pairs.jsonl:1: 'prompt' is empty"),
       ('{"prompt": "a", "chosen": 3, "rejected": "c"}\n', "pairs.jsonl:1: 'chosen' must be a string"),
       ('[1, 2]\n', "pairs.jsonl:1: expected an object"),
       ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "%s", "rejected": "c"}\n'
        % ("ё" * 60), "pairs.jsonl:2: the completion has")]


@pytest.mark.parametrize("text,message", BAD)
def test_a_bad_pairs_file_is_a_one_line_error_naming_the_line(text, message, model_dir, tmp_path, capsys):
    (tmp_path / "pairs.jsonl").write_text(text, encoding="utf-8")
    code = main(["tune", "dpo", "--model", str(model_dir), "--data", str(tmp_path / "pairs.jsonl"),
                 "--out", str(tmp_path / "run"), "--ref-cache", "none"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("lmlab: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_a_bad_kto_label_is_a_one_line_error(model_dir, tmp_path, capsys):
    write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "a", "completion": "b", "label": True},
                                         {"prompt": "a", "completion": "c", "label": "yes"}])
    code = main(["tune", "dpo", "--loss", "kto", "--model", str(model_dir), "--data", str(tmp_path / "kto.jsonl"),
                 "--out", str(tmp_path / "run")])
    assert code == 2 and "kto.jsonl:2: 'label' must be true or false" in capsys.readouterr().err


def saved_warmup(run):
    return json.loads((run / "config.json").read_text())["train"]["warmup_steps"]


def test_the_cli_trains_kto_and_prints_its_metrics(model_dir, kto_file, tmp_path, capsys):
    code = main(["tune", "dpo", "--loss", "kto", "--model", str(model_dir), "--data", str(kto_file), "--out",
                 str(tmp_path / "run"), "--ref-cache", str(tmp_path / "cache"), "--epochs", "3",
                 "--batch-size", "4", "--device", "cpu", "--log-every", "1"])
    out = capsys.readouterr().out
    # --epochs counts passes over the examples: 3 x 6 examples / 4 a step, rounded up
    assert code == 0 and "stopped after 5 steps (epochs)" in out and "computed and cached in" in out
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5]
    # no warm-up unless asked: TrainConfig's 100 steps made every step of a fine-tuning run a warm-up step
    assert saved_warmup(tmp_path / "run") == 0
    assert lines[0]["lr"] == pytest.approx(lr_at(0, TrainConfig(warmup_steps=0, max_steps=5), 5))
    assert {"rewards_chosen", "rewards_rejected", "margin", "accuracy", "kl", "kto_z0"} <= lines[0].keys()
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    # the data is the JSONL under "preference"; "dataset" is a token file that `lmlab train --resume` would open
    assert saved["preference"]["config"]["loss"] == "kto" and "dataset" not in saved


def test_the_cli_trains_adapters_with_lora_flags_and_resumes_with_its_own(model_dir, pairs_file, tmp_path, capsys):
    argv = ["tune", "dpo", "--out", str(tmp_path / "run"), "--max-steps", "1"]
    assert main([*argv, "--model", str(model_dir), "--data", str(pairs_file), "--loss", "ipo", "--lora-rank", "2",
                 "--ref-cache", "none",
                 "--lora-targets", "q_proj,down_proj", "--batch-size", "2", "--save-every", "1"]) == 0
    assert f"LoRA adapter (PEFT layout): {tmp_path / 'run' / 'adapter'}" in capsys.readouterr().out
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 2 and adapter["target_modules"] == ["mlp.down_proj", "self_attn.q_proj"]
    assert main([*argv, "--resume", "--lora-rank", "4"]) == 2
    assert "drop --lora-rank" in capsys.readouterr().err
    assert main([*argv, "--resume", "--max-steps", "2"]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["preference"]["lora"]["rank"] == 2
    assert json.loads((tmp_path / "run" / "final" / "training.json").read_text())["steps"] == 2


@pytest.mark.parametrize("flags, message", [
    # checked when the adapters went on, after the data's copy was written: the corrected rerun was refused
    (["--max-steps", "1", "--lora-rank", "100"], "LoRA rank 100 is above what the targeted matrices can use"),
    (["--max-steps", "1", "--lora-rank", "2", "--lora-targets", "c_attn"], "unknown LoRA target 'c_attn'"),
    # 0 counted as no stop given: tune dpo's default of 100 steps ran instead
    (["--max-steps", "0"], "max_steps (0) must be > 0"),
])
def test_a_refused_setting_leaves_no_folder_and_the_corrected_run_starts(flags, message, model_dir, pairs_file,
                                                                        tmp_path, capsys):
    argv = ["tune", "dpo", "--model", str(model_dir), "--data", str(pairs_file), "--ref-cache", "none",
            "--batch-size", "2", "--out", str(tmp_path / "run")]
    assert main([*argv, *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lmlab: error: {message}") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
    assert main([*argv, "--max-steps", "1"]) == 0
    assert "stopped after 1 steps (max_steps)" in capsys.readouterr().out


def test_the_cli_records_sft_weight_and_refuses_it_where_it_does_not_apply(model_dir, pairs_file, tmp_path,
                                                                          capsys):
    argv = ["tune", "dpo", "--model", str(model_dir), "--data", str(pairs_file), "--ref-cache", "none",
            "--max-steps", "1", "--batch-size", "2"]
    assert main([*argv, "--out", str(tmp_path / "run"), "--sft-weight", "0.5"]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["preference"]["config"]["sft_weight"] == 0.5
    assert main([*argv, "--out", str(tmp_path / "orpo"), "--loss", "orpo", "--sft-weight", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("lmlab: error: sft_weight is for dpo, ipo and simpo, not orpo (ORPO has its own NLL term; KTO "
                   "has no chosen side)")
    assert not (tmp_path / "orpo").exists()
    # SimPO's gamma with another loss was ignored without a word (exit 0)
    assert main([*argv, "--out", str(tmp_path / "g"), "--gamma", "3"]) == 2
    assert capsys.readouterr().err.strip() == ("lmlab: error: gamma is SimPO's target margin, not used by the dpo "
                                               "loss; leave it out")
    # a file where the run's folder or the reference cache goes: "[Errno 17] File exists" before
    (tmp_path / "file").write_text("mine")
    assert main([*argv, "--out", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err.strip() == (f"lmlab: error: {tmp_path / 'file'} is a file, not a folder; name a "
                                               "folder to write the run to")
    argv[argv.index("--ref-cache") + 1] = str(tmp_path / "file")
    assert main([*argv, "--out", str(tmp_path / "c")]) == 2
    assert capsys.readouterr().err.strip() == (f"lmlab: error: the reference cache {tmp_path / 'file'} is a file; "
                                               "name a folder (or leave it out)")
    assert (tmp_path / "file").read_text() == "mine"


def test_the_shipped_rule_task_is_the_generators_output_and_its_rule_separates_the_pairs(tmp_path):
    from lmlab.tune import preference_task as task

    task.write(tmp_path)
    for name in ("pairs.jsonl", "sft.jsonl", "test.jsonl"):
        assert (tmp_path / name).read_bytes() == (task.shipped() / name).read_bytes(), name
    rows = [json.loads(x) for x in (task.shipped() / "pairs.jsonl").read_text(encoding="utf-8").splitlines()]
    assert all(task.follows_rule(r["prompt"], r["chosen"]) and not task.follows_rule(r["prompt"], r["rejected"])
               for r in rows)
    assert task.follows_rule("слова: кот дом ->", " кот, дом.") and not task.follows_rule("words: a b ->", " b, a.")
    assert 0.4 < sum(r["prompt"].startswith("слова") for r in rows) / len(rows) < 0.6  # both languages
    sft = [json.loads(x) for x in (task.shipped() / "sft.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sum(task.follows_rule(r["prompt"], r["completion"]) for r in sft) == len(sft) // 2


def test_a_hand_edited_setting_of_the_wrong_type_is_refused_on_resume(model_dir, pairs_file, tmp_path):
    """A TypeError from PreferenceConfig's comparisons before (GRPO's resume already named the file)."""
    P.run_preference(tmp_path / "cut", config(), model_dir=model_dir, data=pairs_file, cfg=P.PreferenceConfig("dpo"),
                     callbacks=[StopAt(3)], say=lambda s: None)
    path = tmp_path / "cut" / "config.json"
    saved = json.loads(path.read_text())
    saved["preference"]["config"]["beta"] = "high"
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"config.json: beta \('high'\) must be a number"):
        P.run_preference(tmp_path / "cut", resume=True, say=lambda s: None)
