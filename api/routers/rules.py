"""The merchant's business rules, experiments and the re-ranker (admin key).

No `from __future__ import annotations`: FastAPI reads the route signatures at runtime.
"""

import time
from typing import Annotated

import orjson
from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import Response

from api.backend import Backend
from api.errors import CONFIG_NOT_SAVED, ApiError, json_response, request_id
from api.schemas import EXPERIMENT_BODY, RULES_BODY, ErrorBody
from models.experiments import MAX_EXPERIMENTS, Experiment, ExperimentError, parse_counters
from models.experiments import report as experiment_report
from models.feedback import FEATURES
from models.rules import Rules, RulesError


async def json_body(request: Request) -> object:
    try:
        return orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "bad_json", f"the body is not JSON: {exc}") from None


async def experiment_totals(backend: Backend, experiment_id: str) -> dict[str, str]:
    """The experiment's counters ("variant|counter" -> value) summed over the events
    partitions: each partition's workers add to their own hash (`Keys.experiment`)."""
    pipe = backend.redis.pipeline(transaction=False)  # one read per node in a cluster
    for key in backend.keys.experiment_parts(experiment_id, backend.settings.partitions):
        pipe.hgetall(key)
    totals: dict[str, float] = {}
    for part in await pipe.execute():
        for field, value in part.items():
            name = field.decode()
            totals[name] = totals.get(name, 0.0) + float(value)
    return {name: repr(value) for name, value in totals.items()}


def router(backend: Backend) -> APIRouter:
    s = backend.settings
    config = backend.config
    r = APIRouter(dependencies=[Depends(backend.require("admin"))])
    exp_path = Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    no_experiment = {404: {"model": ErrorBody, "description": "No such experiment"}}

    @r.get("/v1/rules", tags=["rules"], summary="The merchant's business rules (admin)")
    async def get_rules(request: Request) -> Response:
        await config.load_rules()
        return json_response(config.rules.to_dict() | {"request_id": request_id(request)})

    @r.put("/v1/rules", tags=["rules"],
           summary="Replace the business rules (admin); every API process applies them "
                   "within a second",
           openapi_extra=RULES_BODY, responses={503: CONFIG_NOT_SAVED})
    async def put_rules(request: Request) -> Response:
        doc = await json_body(request)
        try:
            rules = Rules.parse(doc)
        except RulesError as exc:
            raise ApiError(422, "invalid_rules", exc.detail, f"body.{exc.field}") from None
        await config.save_rules(rules)
        return json_response(rules.to_dict() | {"request_id": request_id(request)})

    @r.get("/v1/experiments", tags=["experiments"], summary="Experiment definitions (admin)")
    async def list_experiments(request: Request) -> Response:
        await config.load_experiments()
        return json_response({"experiments": [e.to_dict() for _, e in
                                              sorted(config.experiments.items())],
                              "default": config.default_strategy.to_dict(),
                              "request_id": request_id(request)})

    @r.put("/v1/experiments/{experiment_id}", tags=["experiments"],
           summary="Create or replace an experiment (admin); every API process applies it "
                   "within a second", openapi_extra=EXPERIMENT_BODY,
           responses={503: CONFIG_NOT_SAVED})
    async def put_experiment(request: Request,
                             experiment_id: Annotated[str, exp_path]) -> Response:
        doc = await json_body(request)
        try:
            exp = Experiment.parse(experiment_id, doc)
        except ExperimentError as exc:
            where = "path.experiment_id" if exc.field == "id" else f"body.{exc.field}"
            raise ApiError(422, "invalid_experiment", exc.detail, where) from None
        await config.load_experiments()
        current = dict(config.experiments)
        if experiment_id not in current and len(current) >= MAX_EXPERIMENTS:
            raise ApiError(422, "too_many_experiments", f"at most {MAX_EXPERIMENTS}; delete an "
                           "ended one first", "path.experiment_id")
        current[experiment_id] = exp
        await config.save_experiments(current)
        return json_response(exp.to_dict() | {"request_id": request_id(request)})

    @r.delete("/v1/experiments/{experiment_id}", tags=["experiments"],
              summary="Stop and forget an experiment and its counters (admin)",
              responses={**no_experiment, 503: CONFIG_NOT_SAVED})
    async def delete_experiment(request: Request,
                                experiment_id: Annotated[str, exp_path]) -> Response:
        await config.load_experiments()
        current = dict(config.experiments)
        if current.pop(experiment_id, None) is None:
            raise ApiError(404, "not_found", f"no experiment {experiment_id!r}",
                           "path.experiment_id")
        await config.save_experiments(current)
        # Each events partition keeps its own counters (the cluster client splits the DEL).
        await backend.redis.delete(*backend.keys.experiment_parts(experiment_id, s.partitions))
        return json_response({"deleted": experiment_id, "request_id": request_id(request)})

    @r.get("/v1/experiments/{experiment_id}/report", tags=["experiments"],
           summary="Per-variant impressions, CTR, conversion, cross-sell rate, order value "
                   "and revenue per shopper, with 95% intervals and a verdict (admin)",
           responses=no_experiment)
    async def experiment_report_route(request: Request,
                                      experiment_id: Annotated[str, exp_path]) -> Response:
        await config.load_experiments()
        exp = config.experiments.get(experiment_id)
        if exp is None:
            raise ApiError(404, "not_found", f"no experiment {experiment_id!r}",
                           "path.experiment_id")
        counters = parse_counters(await experiment_totals(backend, experiment_id))
        out = experiment_report(exp, counters, time.time())
        return json_response(out | {"request_id": request_id(request)})

    @r.get("/v1/reranker", tags=["experiments"],
           summary="The learned re-ranker: examples, progressive AUC against the plain "
                   "order, whether it is used (admin)")
    async def reranker_status(request: Request) -> Response:
        await config.load_reranker()
        rr = config.reranker
        weights = dict(zip(FEATURES, rr["weights"], strict=True)) if rr["weights"] else None
        return json_response({**rr, "weights": weights, "intercept": rr["intercept"],
                              "min_examples": s.reranker_min_examples,
                              "default_ranking": s.ranking, "request_id": request_id(request)})

    return r
