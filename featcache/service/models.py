"""Pydantic models for every request and response body."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ErrorResponse(BaseModel):
    error: str = Field(description="exception type, e.g. ImageError, TooLarge, NotFoundError")
    message: str


class EmbedResponse(BaseModel):
    fingerprint: str
    tap: str
    dim: int
    vector: list[float]
    timings_ms: dict[str, float]


class LabelScore(BaseModel):
    label: str
    probability: float


class ClassifyResponse(BaseModel):
    head: str
    fingerprint: str
    label: str = Field(description="the most probable label")
    top: list[LabelScore]
    timings_ms: dict[str, float]


class SearchHit(BaseModel):
    key: str
    sha256: str
    score: float = Field(description="cosine similarity")


class SearchResponse(BaseModel):
    query_key: str | None = None
    k: int
    hits: list[SearchHit]
    timings_ms: dict[str, float]


class HeadInfo(BaseModel):
    name: str
    labels: list[str]
    tap: str
    type: str
    fingerprint: str
    loaded_at: str
    reloads: int


class IndexInfo(BaseModel):
    kind: str
    count: int
    dim: int
    tap: str
    params: dict
    recall_at_10: float | None = None
    memory_bytes: int | None = None
    deleted_pending: int = 0


class InfoResponse(BaseModel):
    fingerprint: str
    backbone: str
    precision: str
    device: str
    taps: list[str]
    heads: list[HeadInfo]
    index: IndexInfo | None = None
    batching: dict
    limits: dict


class HealthResponse(BaseModel):
    status: str


class ReloadResponse(BaseModel):
    head: HeadInfo
    previous_loaded_at: str
