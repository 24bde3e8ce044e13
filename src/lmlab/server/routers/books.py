"""/api/v1/books: upload (multipart), list, detail with stats, preview, delete."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Query, Response, UploadFile

from ..app import StateDep
from ..schemas import Book, BookPreview
from ..services import book_stats, need_book, need_book_text, remove_book, save_upload

router = APIRouter()


@router.get("/books", tags=["books"], response_model=list[Book])
def list_books(state: StateDep) -> list[dict[str, Any]]:
    return state.db.list_books()


@router.post("/books", tags=["books"], status_code=201, response_model=Book,
             summary="upload a book (.txt .md .html .epub .pdf; UTF-8, UTF-16, cp1251 or KOI8-R)")
def upload_book(state: StateDep, file: Annotated[UploadFile, File()],
                overwrite: bool = Query(False)) -> dict[str, Any]:
    return save_upload(state, file, overwrite=overwrite)


@router.get("/books/{name}", tags=["books"], response_model=Book)
def get_book(state: StateDep, name: str) -> dict[str, Any]:
    row = need_book(state, name)
    return {**row, **book_stats(need_book_text(state, name)[0])}


@router.get("/books/{name}/preview", tags=["books"], response_model=BookPreview)
def preview_book(state: StateDep, name: str, chars: int = Query(2000, ge=1, le=100_000)) -> BookPreview:
    need_book(state, name)
    header, text = need_book_text(state, name, chars)
    return BookPreview(name=name, text=text, truncated=header["chars"] > chars)


@router.delete("/books/{name}", tags=["books"], status_code=204)
def delete_book(state: StateDep, name: str) -> Response:
    remove_book(state, name)
    return Response(status_code=204)
