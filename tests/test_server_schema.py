"""Property-based run against the OpenAPI schema (schemathesis): whatever the schema allows, and what it
does not, the server answers with a status below 500, for 20 examples per operation (LMLAB_SCHEMA_EXAMPLES
sets another number). The workspace holds a book and a small trained-looking model so generation and
downloads reach real code paths."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from test_server_support import BOOK  # noqa: E402

from lmlab.models import ModelConfig, Transformer  # noqa: E402
from lmlab.models.io import save_pretrained  # noqa: E402
from lmlab.server import Settings, build_asgi  # noqa: E402
from lmlab.server.app import AppState  # noqa: E402
from lmlab.tokenizers import Tokenizer  # noqa: E402

_WS = Path(tempfile.mkdtemp(prefix="lmlab-schema-"))


def _app():
    s = Settings(workspace=_WS, poll_s=0.2, max_upload_bytes=64 * 1024, memory_budget_bytes=2**30,
                 allowed_hosts=("testserver", "127.0.0.1", "localhost"))
    app = build_asgi(s)
    state: AppState = app.app.state.lmlab
    (state.ws.books / "tales.txt").write_text(BOOK, encoding="utf-8")
    state.db.add_book("tales.txt", len(BOOK.encode()), len(BOOK), "utf-8")
    tok = Tokenizer.train([BOOK], kind="char", vocab_size=128)
    cfg = ModelConfig.preset("gpt2-tiny", vocab_size=128, n_layer=1, block_size=32)
    state.db.add_model("m", cfg.to_dict(), "gpt2-tiny", "char", 128)
    save_pretrained(state.ws.model_path("m"), Transformer(cfg), tok)
    return app


APP = _app()
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


# built at collection (schemathesis reads the schema then), so removed at exit even when deselected
atexit.register(lambda: (APP.app.state.lmlab.db.close(), shutil.rmtree(_WS, ignore_errors=True)))


@schema.parametrize()
@settings(max_examples=int(os.environ.get("LMLAB_SCHEMA_EXAMPLES", "20")), deadline=None,
          suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    case.call_and_validate(headers={"X-Lmlab-Request": "1"}, checks=[not_a_server_error])
