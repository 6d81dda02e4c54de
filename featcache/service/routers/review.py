"""Where a head is wrong or unsure (out-of-fold predictions), and near-duplicate groups."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Path, Query

from ...errors import UsageError
from ..deps import get_state
from ..models import GROUP_MEMBERS_MAX, DuplicateGroup, DuplicatesResponse, ImageItem, ReviewItem, ReviewResponse
from ..state import ServiceState

router = APIRouter(prefix="/v1", tags=["check"])
REVIEW_PAGE_MAX = 200
GROUPS_PAGE_MAX = 100


@router.get("/heads/{name}/review", response_model=ReviewResponse)
async def review(name: str = Path(max_length=128),
                 which: Literal["wrong", "unsure"] = Query("wrong", description="wrong: most confident mistakes "
                                                           "first; unsure: least confident predictions first"),
                 offset: int = Query(0, ge=0, le=10**9), limit: int = Query(48, ge=1, le=REVIEW_PAGE_MAX),
                 state: ServiceState = Depends(get_state)) -> ReviewResponse:
    """The served images a head gets wrong or is least sure of, from cross-validated (out-of-fold) predictions.

    The head's type and parameters are refitted over K folds of the cache's labelled images (as
    ``featcache train --cv``), so no image is judged by a head that saw it. The first request per
    head version computes this (seconds to minutes for large caches); later ones read it.
    """
    head = state.heads.get(name)
    if head.bundle.is_ensemble:
        raise UsageError(f"head {name!r} is an ensemble over several backbones, which the server does not "
                         "cross-validate; run `featcache train --fingerprint A B ... --cv 5 --report report.html`")
    r = await state.reviews.review(head)
    order = r.order(which)
    page = order[offset : offset + limit]
    items = [ReviewItem(sha256=str(r.sha256[i]), key=str(r.keys[i]), label=str(r.truth[i]),
                        predicted=str(r.predicted[i]), probability=float(r.confidence[i]),
                        label_probability=float(r.truth_probability[i])) for i in page.tolist()]
    return ReviewResponse(head=head.name, which=which, folds=r.folds, rows=len(r.truth), accuracy=r.accuracy,
                          seconds=round(r.seconds, 3), total=len(order), offset=offset, limit=limit, items=items)


@router.get("/duplicates", response_model=DuplicatesResponse)
async def duplicates(threshold: float = Query(0.97, ge=0.5, le=1.0,
                                              description="cosine at or above which two images are duplicates"),
                     offset: int = Query(0, ge=0, le=10**9), limit: int = Query(20, ge=1, le=GROUPS_PAGE_MAX),
                     state: ServiceState = Depends(get_state)) -> DuplicatesResponse:
    """Groups of near-duplicate served images (``featcache dedupe``), largest first; computed once per threshold."""
    found = await state.reviews.duplicates(threshold)
    label = state.catalogue.label_of
    groups = [DuplicateGroup(size=g["size"], min_cosine=g["min_cosine"],
                             images=[ImageItem(sha256=s, key=k, label=label(s))
                                     for s, k in list(zip(g["sha256"], g["keys"], strict=True))[:GROUP_MEMBERS_MAX]])
              for g in found["groups"][offset : offset + limit]]
    return DuplicatesResponse(threshold=found["threshold"], images=found["images"], duplicates=found["duplicates"],
                              total=len(found["groups"]), offset=offset, limit=limit, groups=groups)
