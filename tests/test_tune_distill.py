"""lmlab tune distill: the logit-distillation loss against the formula computed here (T^2, alpha 0 and 1), alpha 0
is plain training row for row, exact resume in both modes, a distilled student really is closer to its teacher
than one trained without it, and the refusals."""

import json

import pytest
import torch
import torch.nn.functional as F

import lmlab
from lmlab.cli import main
from lmlab.data import TokenDataset, prepare_texts
from lmlab.train import TrainConfig, train
from lmlab.train.demo_corpus import demo_corpus
from lmlab.train.trainer import Callback
from lmlab.tune.distill import SAMPLES, DistillConfig, DistillObjective, mean_kl, resume_distill, run_distill

TEXT = demo_corpus(160, seed=3)
STUDENT = dict(family="llama", n_layer=1, n_head=2, n_embd=16, block_size=32, intermediate_size=32)


def tiny(**kw):
    return TrainConfig(**{**dict(batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, log_every=1, eval_every=4,
                                 eval_batches=2, save_every=4, device="cpu"), **kw})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A teacher (2 layers, trained 60 steps) on the tales, the book file, and the teacher's data."""
    root = tmp_path_factory.mktemp("distill")
    book = root / "tales.txt"
    book.write_text(TEXT, encoding="utf-8")
    tok = lmlab.Tokenizer.train([TEXT], kind="bpe", vocab_size=300)
    assert len(tok) == 300
    ds = prepare_texts([TEXT], tok, root / "data", seq_len=32)
    cfg = lmlab.ModelConfig(family="llama", n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=len(tok))
    train(cfg, tok, ds, tiny(max_steps=60, eval_every=0, save_every=0, log_every=30), root / "teacher")
    return root, book, ds


def student_config(vocab_size):
    return lmlab.ModelConfig(**STUDENT, vocab_size=vocab_size)


def test_the_loss_is_the_formula(setup):
    root, _, ds = setup
    teacher, tok = lmlab.load(root / "teacher" / "final")
    torch.manual_seed(1)
    student = lmlab.Transformer(student_config(len(tok)))
    x, y = ds.sample_batch(3, 32, torch.Generator().manual_seed(0))
    y[0, :5] = -100  # ignored targets count in neither part
    with torch.no_grad():
        s, t = student(x).logits.double(), teacher(x).logits.double()
    keep = y != -100
    ce = F.cross_entropy(s[keep], y[keep])
    for T in (1.0, 3.0):
        p_t = torch.softmax(t / T, -1)
        kl = (p_t * (p_t.log() - torch.log_softmax(s / T, -1))).sum(-1)[keep].mean()
        for alpha in (0.0, 0.3, 1.0):
            loss, m = DistillObjective(teacher, T, alpha).loss(student, (x, y))
            want = alpha * T * T * kl + (1 - alpha) * ce
            assert float(loss.detach()) == pytest.approx(float(want), abs=1e-6)
            assert float(m["kd_loss"]) == pytest.approx(float(T * T * kl), abs=1e-6)
            assert float(m["ce_loss"]) == pytest.approx(float(ce), abs=1e-6)
    # T = 1, alpha = 1: the cross-entropy to the teacher's distribution, less its entropy (a constant)
    p_t = torch.softmax(t, -1)
    soft_ce = -(p_t * torch.log_softmax(s, -1)).sum(-1)[keep].mean()
    entropy = -(p_t * p_t.log()).sum(-1)[keep].mean()
    loss, _ = DistillObjective(teacher, 1.0, 1.0).loss(student, (x, y))
    assert float(loss.detach()) == pytest.approx(float(soft_ce - entropy), abs=1e-6)
    # ... so the student's gradient is the cross-entropy's own
    student.zero_grad()
    loss.backward()
    ours = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    (-(p_t.float() * torch.log_softmax(student(x).logits, -1)).sum(-1)[keep].mean()).backward()
    for g, want in zip(ours, (p.grad for p in student.parameters())):
        torch.testing.assert_close(g, want, atol=1e-6, rtol=1e-4)
    # the teacher is not trained
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training


def rows(run, keys=("step", "loss", "grad_norm", "val_loss", "ce_loss", "kd_loss", "val_kl")):
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: m[k] for k in keys if k in m} for m in lines]


def test_alpha_zero_is_plain_training(setup, tmp_path):
    root, book, _ = setup
    run_distill(root / "teacher" / "final", [book], tmp_path / "kd", tiny(max_steps=6),
                DistillConfig(alpha=0.0), model_config=student_config(300), echo=lambda *_: None)
    tok = lmlab.Tokenizer.load(root / "teacher" / "final" / "tokenizer.json")
    train(student_config(300), tok, TokenDataset.open(tmp_path / "kd" / "data", tok), tiny(max_steps=6),
          tmp_path / "plain")
    kd, plain = rows(tmp_path / "kd"), rows(tmp_path / "plain")
    assert [{k: v for k, v in r.items() if k not in ("ce_loss", "kd_loss", "val_kl")} for r in kd] == plain
    assert [r["ce_loss"] for r in kd] == pytest.approx([r["loss"] for r in plain], abs=1e-6)
    assert all(r["kd_loss"] > 0 for r in kd) and "val_kl" in kd[-1]


class StopAt(Callback):
    """Interrupts a run after `step` (a checkpoint is written), as Ctrl-C would."""

    def __init__(self, step):
        self.step = step

    def on_step(self, trainer, metrics):
        trainer.should_stop = trainer.step >= self.step


@pytest.mark.parametrize("mode", ["logits", "sequence"])
def test_a_distill_run_resumes_exactly(setup, tmp_path, mode):
    root, book, _ = setup
    cfg = DistillConfig(mode=mode, temperature=2.0, alpha=0.7, teacher_samples=12, continuation_tokens=24)
    args = dict(model_config=student_config(300), echo=lambda *_: None)
    run_distill(root / "teacher" / "final", [book], tmp_path / "whole", tiny(max_steps=8), cfg, **args)
    run_distill(root / "teacher" / "final", [book], tmp_path / "cut", tiny(max_steps=8), cfg,
                callbacks=[StopAt(4)], **args)
    if mode == "sequence":
        samples = (tmp_path / "cut" / SAMPLES).read_text()
        assert samples == (tmp_path / "whole" / SAMPLES).read_text() and len(samples.splitlines()) == 12
    assert rows(tmp_path / "cut")[-1]["step"] == 4
    resume_distill(tmp_path / "cut", echo=lambda *_: None)
    whole, cut = rows(tmp_path / "whole"), rows(tmp_path / "cut")
    assert len(whole) == len(cut) == 8 and [r["step"] for r in whole if "val_kl" in r] == [4, 8]
    for a, b in zip(whole, cut):
        assert a.keys() == b.keys()
        assert [a[k] for k in a] == pytest.approx([b[k] for k in a], abs=1e-6)


def test_sequence_resume_reads_the_samples_back(setup, tmp_path):
    """The samples file is the data: a resumed run trains on what it holds, never on a new draw."""
    root, book, _ = setup
    cfg = DistillConfig(mode="sequence", teacher_samples=8, continuation_tokens=16)
    run_distill(root / "teacher" / "final", [book], tmp_path / "run", tiny(max_steps=4), cfg,
                model_config=student_config(300), echo=lambda *_: None)
    path = tmp_path / "run" / SAMPLES
    # U+2028 and U+0085 stay raw in JSON lines (ensure_ascii=False): they split a line for str.splitlines()
    text = "zz\u2028 zz\u0085 " * 20
    path.write_text("".join(json.dumps({"prompt": "", "completion": text}, ensure_ascii=False) + "\n"
                            for _ in range(8)), encoding="utf-8")
    resume_distill(tmp_path / "run", {"max_steps": 5}, echo=lambda *_: None)
    ds = TokenDataset.open(tmp_path / "run" / "samples-data")
    tok = lmlab.Tokenizer.load(tmp_path / "run" / "tokenizer.json")
    assert ds.tokens[: len(tok.encode(text))].tolist() == tok.encode(text)


def test_a_distilled_student_is_closer_to_the_teacher(setup, tmp_path):
    """Same student init, data order and steps; only alpha differs. KD must bring the held-out KL clearly down."""
    root, book, _ = setup
    teacher, _ = lmlab.load(root / "teacher" / "final")
    kl = {}
    for alpha in (0.0, 0.9):
        out = tmp_path / f"a{alpha}"
        run_distill(root / "teacher" / "final", [book], out, tiny(max_steps=40, eval_every=0, save_every=0),
                    DistillConfig(alpha=alpha, temperature=1.0), model_config=student_config(300),
                    echo=lambda *_: None)
        student, _ = lmlab.load(out / "final")
        kl[alpha] = mean_kl(student, teacher, TokenDataset.open(out / "data"), 8, 32)
    assert kl[0.9] < 0.8 * kl[0.0], kl


def test_refusals_are_one_line_with_exit_2(setup, tmp_path, capsys):
    root, book, _ = setup
    other = tmp_path / "other"
    tok = lmlab.Tokenizer.train([TEXT[:5000]], kind="bpe", vocab_size=280)
    lmlab.save(other, lmlab.Transformer(student_config(300)), tok)
    cases = [
        (["--teacher", str(root / "teacher" / "final"), "--model", str(other)],
         "does not share the teacher's tokenizer"),
        (["--teacher", str(tmp_path / "nope"), "--preset", "llama-tiny"], "model directory not found"),
        # the Trainer's memory check came after the token file: OUT/data made the corrected rerun refused
        (["--teacher", str(root / "teacher" / "final"), "--preset", "llama-tiny", "--batch-size", "1000000000"],
         "this model and batch need ~"),
    ]
    for flags, why in cases:
        out = tmp_path / "out"
        assert main(["tune", "distill", *flags, "--data", str(book), "--out", str(out), "--max-steps", "2"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("lmlab: error: ") and why in err and "\n" not in err, err
        assert not out.exists()  # nothing written


def test_windows_fit_the_shorter_context_of_teacher_and_student(setup, tmp_path, capsys):
    """A preset student (llama-tiny: a 128-token context) under the 32-token teacher: without --seq-len the
    windows are the teacher's 32 tokens (the teacher must read every window it scores); a longer --seq-len is
    refused in one line before anything is written."""
    root, book, _ = setup
    out = tmp_path / "preset"
    assert main(["tune", "distill", "--teacher", str(root / "teacher" / "final"), "--preset", "llama-tiny",
                 "--data", str(book), "--out", str(out), "--max-steps", "2", "--batch-size", "2",
                 "--eval-every", "0", "--save-every", "0"]) == 0
    assert json.loads((out / "config.json").read_text())["train"]["seq_len"] == 32
    assert lmlab.ModelConfig.load(out / "final" / "config.json").block_size == 128
    capsys.readouterr()
    assert main(["tune", "distill", "--teacher", str(root / "teacher" / "final"), "--preset", "llama-tiny",
                 "--data", str(book), "--out", str(tmp_path / "long"), "--max-steps", "2", "--seq-len", "64"]) == 2
    assert capsys.readouterr().err.strip() == ("lmlab: error: --seq-len (64) is longer than the teacher's context "
                                               "(32 tokens); the teacher scores every window")
    assert not (tmp_path / "long").exists()


def test_a_distill_run_will_not_resume_on_another_teacher(setup, tmp_path):
    """The teacher's weights changed since the run began (same tokenizer): the resumed run would learn from
    another model. It resumed without a word; now it is refused naming the teacher."""
    import shutil

    from lmlab.models.io import load_pretrained, save_pretrained
    root, book, _ = setup
    teacher = tmp_path / "teacher"
    shutil.copytree(root / "teacher" / "final", teacher)
    run_distill(teacher, [book], tmp_path / "cut", tiny(max_steps=8), DistillConfig(), callbacks=[StopAt(4)],
                model_config=student_config(300), echo=lambda *_: None)
    model, tok = load_pretrained(teacher)
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    save_pretrained(teacher, model, tok)
    with pytest.raises(ValueError, match=r"the teacher's weights \(.*\) differ from those the run started with"):
        resume_distill(tmp_path / "cut", echo=lambda *_: None)


def test_a_hand_edited_setting_of_the_wrong_type_is_refused_on_resume(setup, tmp_path):
    root, book, _ = setup
    run_distill(root / "teacher" / "final", [book], tmp_path / "cut", tiny(max_steps=8), DistillConfig(),
                callbacks=[StopAt(4)], model_config=student_config(300), echo=lambda *_: None)
    path = tmp_path / "cut" / "config.json"
    saved = json.loads(path.read_text())
    saved["distill"]["temperature"] = "hot"
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"config.json: temperature \('hot'\) must be a number"):
        resume_distill(tmp_path / "cut", echo=lambda *_: None)
