"""Pydantic models for every request and response body."""

from __future__ import annotations

from pydantic import BaseModel, Field

GROUP_MEMBERS_MAX = 50  # members of one near-duplicate group listed


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
    label: str | None = Field(None, description="the image's label in the cache (null: unlabelled)")


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
    metrics: dict = Field(default_factory=dict, description="the bundle's evaluation at training (accuracy, ...)")


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
    images: int = Field(description="images served: decoded rows of the served fingerprint that a file holds")
    backbone: str
    precision: str
    device: str
    taps: list[str]
    heads: list[HeadInfo]
    index: IndexInfo | None = None
    batching: dict
    limits: dict
    thumbnails: dict = Field(description="thumbnail memory cache: items, bytes, max_bytes, hits, misses")


class HealthResponse(BaseModel):
    status: str


class ReloadResponse(BaseModel):
    head: HeadInfo
    previous_loaded_at: str


class ImageItem(BaseModel):
    sha256: str = Field(description="content hash: the image's identity (thumbnail: /v1/images/{sha256}/thumbnail)")
    key: str = Field(description="the image's key in the cache (search by key)")
    label: str | None = Field(None, description="null: unlabelled")


class LabelCount(BaseModel):
    label: str = Field(description='"" for the unlabelled images')
    count: int


class LabelsResponse(BaseModel):
    images: int
    total: int = Field(description="distinct labels (the unlabelled count as one)")
    offset: int
    limit: int
    labels: list[LabelCount]


class ImagesResponse(BaseModel):
    label: str | None = Field(None, description="the label listed (null: every image)")
    total: int = Field(description="images of this label (of all labels when label is null)")
    offset: int
    limit: int
    images: list[ImageItem] = Field(description="sorted by label, then key")


class ReviewItem(BaseModel):
    sha256: str
    key: str
    label: str = Field(description="the true label")
    predicted: str
    probability: float = Field(description="probability of the predicted label")
    label_probability: float = Field(description="probability of the true label")


class ReviewResponse(BaseModel):
    head: str
    which: str = Field(description="wrong: most confident mistakes first; unsure: least confident predictions first")
    folds: int = Field(description="cross-validation folds the predictions come from")
    rows: int = Field(description="labelled images predicted")
    accuracy: float = Field(description="out-of-fold accuracy")
    seconds: float = Field(description="time the cross-validation took (once per head version)")
    total: int = Field(description="images in this list")
    offset: int
    limit: int
    items: list[ReviewItem]


class DuplicateGroup(BaseModel):
    size: int
    min_cosine: float = Field(description="lowest cosine similarity between two members")
    images: list[ImageItem] = Field(description=f"the members (at most {GROUP_MEMBERS_MAX})")


class DuplicatesResponse(BaseModel):
    threshold: float
    images: int = Field(description="images compared")
    duplicates: int = Field(description="images that are a near-duplicate of another (group sizes minus one)")
    total: int = Field(description="groups found")
    offset: int
    limit: int
    groups: list[DuplicateGroup] = Field(description="largest first")
