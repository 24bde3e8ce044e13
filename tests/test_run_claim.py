"""Two writers into one run folder: the folder is held (RUN/.lock) from the first file a new run writes, so the
second `lmlab train` is refused before it writes anything and deletes nothing. Before, the check came first and the
lock only in the Trainer: both wrote tokenizer.json and data/, the one refused then deleted the folder it thought it
had made, and the run that trained was left with the other's data (its resume refused: another tokenizer)."""

import threading

import pytest

from lmlab.train import TrainConfig, recipes
from lmlab.train.checkpoint import lock_run, unlock_run
from lmlab.train.demo_corpus import demo_corpus


@pytest.fixture()
def book(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text(demo_corpus(n_stories=20, seed=1), encoding="utf-8")
    return path


def config():
    return TrainConfig(max_steps=2, batch_size=2, seq_len=32, log_every=1, eval_every=0, save_every=0, device="cpu")


def held_by_another(folder):
    """lock_run from another thread: its hold is not this thread's to take again, as another process's is not."""
    keys = []
    thread = threading.Thread(target=lambda: keys.append(lock_run(folder)))
    thread.start()
    thread.join()
    return keys[0]


def files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_a_folder_another_run_holds_gets_nothing_written(tmp_path, book):
    out = tmp_path / "run"
    out.mkdir()
    other = held_by_another(out)
    try:
        with pytest.raises(ValueError, match="is being trained by another process"):
            recipes.train_from_sources(out, config(), sources=[book], preset="tiny", vocab_size=300)
        assert files(out) == [".lock"]  # no tokenizer.json, no data/ of this call's
    finally:
        unlock_run(other)
    recipes.train_from_sources(out, config(), sources=[book], preset="tiny", vocab_size=300)  # once it is free
    assert (out / "final" / "model.safetensors").is_file()


def test_the_refused_run_deletes_nothing_of_the_run_that_took_the_folder(tmp_path, book, monkeypatch):
    """The other run makes the folder and writes its data after this one's first check (the folder was not there,
    so it took itself for the folder's maker) and before this one's first write."""
    out, holds = tmp_path / "run", []
    find = recipes.find_documents

    def meanwhile(sources):
        (out / "data").mkdir(parents=True)
        (out / "data" / "tokens.json").write_text("the other run's")
        holds.append(held_by_another(out))
        return find(sources)

    monkeypatch.setattr(recipes, "find_documents", meanwhile)
    try:
        with pytest.raises(ValueError, match="is being trained by another process"):
            recipes.train_from_sources(out, config(), sources=[book], preset="tiny", vocab_size=300)
        assert (out / "data" / "tokens.json").read_text() == "the other run's"
        assert files(out) == [".lock", "data", "data/tokens.json"]
    finally:
        unlock_run(holds[0])


def test_a_start_that_fails_after_its_first_file_leaves_a_folder_that_takes_the_next_start(tmp_path, book):
    """A folder made before the run (the web app's): what the failed start wrote goes, so starting again works."""
    out = tmp_path / "app"
    out.mkdir()
    with pytest.raises(ValueError, match="counts evaluations"):  # the Trainer's check, after tokenizer and data
        recipes.train_from_sources(out, TrainConfig(**{**config().to_dict(), "early_stopping_patience": 2}),
                                   sources=[book], preset="tiny", vocab_size=300)
    assert files(out) == [".lock", "phase.json"]  # the progress note the web app reads; no retry refuses it
    recipes.train_from_sources(out, config(), sources=[book], preset="tiny", vocab_size=300)
    assert (out / "final" / "model.safetensors").is_file()


def test_a_distillation_into_a_folder_another_run_holds_writes_nothing(tmp_path, book):
    from lmlab.models import ModelConfig, Transformer
    from lmlab.models.io import save_pretrained
    from lmlab.tokenizers import Tokenizer
    from lmlab.tune.distill import run_distill

    tok = Tokenizer.train([book.read_text(encoding="utf-8")], kind="bpe", vocab_size=300)
    teacher = save_pretrained(tmp_path / "teacher", Transformer(ModelConfig.preset("tiny", vocab_size=len(tok))), tok)
    out = tmp_path / "run"
    out.mkdir()
    other = held_by_another(out)
    try:
        with pytest.raises(ValueError, match="is being trained by another process"):
            run_distill(teacher, [book], out, config(), preset="tiny", echo=lambda *a: None)
        assert files(out) == [".lock"]
    finally:
        unlock_run(other)


def test_a_lock_file_that_is_a_link_is_not_opened_through(tmp_path):
    """The lock was opened with O_CREAT through whatever RUN/.lock was: a link made a file where it pointed (the
    web app's DELETE of a run opens it too)."""
    out, outside = tmp_path / "run", tmp_path / "outside" / "made.txt"
    out.mkdir()
    outside.parent.mkdir()
    (out / ".lock").symlink_to(outside)
    with pytest.raises(ValueError, match=r"\.lock is a symbolic link, not the run's lock file; remove it"):
        lock_run(out)
    assert not outside.exists()


def test_an_out_that_is_a_link_to_nothing_is_a_one_line_error(tmp_path, book):
    (tmp_path / "dl").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="is a symbolic link to a folder that does not exist"):
        recipes.train_from_sources(tmp_path / "dl", config(), sources=[book], preset="tiny", vocab_size=300)
    assert not (tmp_path / "nowhere").exists()
