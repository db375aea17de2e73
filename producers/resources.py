"""The resources an agent is handed for a rollout, in Agent Lightning 0.3's shapes.

An algorithm publishes named resources (``{"main_llm": LLM(...), "system": PromptTemplate(...)}``);
a runner passes them to the agent's rollout, where ``@rollout`` functions get the first ``LLM`` as
``llm`` and the first ``PromptTemplate`` as ``prompt_template``. They are plain dataclasses (the
bare SDK does not depend on pydantic); ``to_dict`` / ``resource_from_dict`` give the JSON form that
travels on the broker and lands in the archive.
"""

from __future__ import annotations

import functools
import string
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar


@dataclass(kw_only=True)
class Resource:
    """A tunable resource; ``resource_type`` names the kind in its JSON form."""

    resource_type: ClassVar[str] = "resource"

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: the fields plus ``resource_type``."""
        return {"resource_type": self.resource_type, **asdict(self)}

    def model_dump(self) -> dict[str, Any]:
        """Agent Lightning's (pydantic) name for :meth:`to_dict`."""
        return self.to_dict()


@dataclass(kw_only=True)
class LLM(Resource):
    """An OpenAI-compatible endpoint and the model (and sampling parameters) to call it with."""

    resource_type: ClassVar[str] = "llm"
    endpoint: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    sampling_parameters: dict[str, Any] = field(default_factory=dict)

    def get_base_url(self, *args: Any, **kwargs: Any) -> str:
        """The endpoint (Agent Lightning's per-rollout proxy URLs do not apply: boltstream's router tags
        requests by header, so every rollout uses the same base URL)."""
        return self.endpoint

    def to_dict(self) -> dict[str, Any]:
        as_dict = super().to_dict()
        as_dict.pop("api_key")  # resources are published and archived: never a secret in them
        return as_dict


@dataclass(kw_only=True)
class PromptTemplate(Resource):
    """A prompt template the algorithm tunes; ``format(**values)`` fills it with its ``engine``:
    ``f-string`` (``str.format``), ``jinja`` (jinja2, sandboxed: a template cannot reach Python internals;
    a missing value is an error) or ``poml`` (Microsoft's POML, rendered to text; the ``[templates]``
    extra installs both)."""

    resource_type: ClassVar[str] = "prompt_template"
    template: str
    engine: str = "f-string"

    ENGINES: ClassVar[tuple[str, ...]] = ("jinja", "f-string", "poml")

    def __post_init__(self) -> None:
        if self.engine not in self.ENGINES:
            raise ValueError(f"PromptTemplate engine must be one of {self.ENGINES}, not {self.engine!r}")

    def format(self, **values: Any) -> str:
        if self.engine == "jinja":
            return _jinja_template(self.template).render(**values)
        if self.engine == "poml":
            return _render_poml(self.template, values)
        return self.template.format(**values)

    def placeholders(self) -> list[str]:
        """The names an f-string template expects, in order of first use."""
        if self.engine != "f-string":
            raise ValueError(f"placeholders() reads f-string templates, not {self.engine!r} ones")
        names: list[str] = []
        for _, name, _, _ in string.Formatter().parse(self.template):
            if name is not None:
                root = name.split(".")[0].split("[")[0]
                if root and root not in names:
                    names.append(root)
        return names


def _missing_engine(engine: str, package: str) -> RuntimeError:
    return RuntimeError(
        f"PromptTemplate(engine={engine!r}) needs the {package} package: pip install 'boltstream[templates]'"
    )


@functools.lru_cache(maxsize=256)
def _jinja_template(source: str) -> Any:
    """The compiled template (cached: an agent formats the same few templates on every rollout)."""
    try:
        from jinja2 import StrictUndefined
        from jinja2.sandbox import SandboxedEnvironment
    except ImportError:
        raise _missing_engine("jinja", "jinja2") from None
    return SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True).from_string(source)


def _render_poml(source: str, values: dict[str, Any]) -> str:
    try:
        import poml
    except ImportError:
        raise _missing_engine("poml", "poml") from None
    # chat=False with message_dict: the prompt as one text, what format() returns for every engine
    return str(poml.poml(source, context=values, chat=False, format="message_dict"))


#: Named resources an agent receives for a rollout: ``{"main_llm": LLM(...), ...}``.
NamedResources = dict[str, Resource]


def _resource_types() -> dict[str, type[Resource]]:
    return {cls.resource_type: cls for cls in (LLM, ProxyLLM, PromptTemplate)}


def resource_from_dict(data: Mapping[str, Any]) -> Resource:
    """A resource from its JSON form (``resource_type`` says which); unknown keys are a clear error."""
    kind = data.get("resource_type")
    types = _resource_types()
    cls = types.get(str(kind))
    if cls is None:
        raise ValueError(f"unknown resource_type {kind!r}; expected one of {sorted(types)}")
    known = {f.name for f in fields(cls)}
    extra = set(data) - known - {"resource_type"}
    if extra:
        raise ValueError(f"{cls.__name__} has no field(s) {sorted(extra)}")
    return cls(**{k: v for k, v in data.items() if k in known})


def resources_to_dict(resources: Mapping[str, Resource]) -> dict[str, dict[str, Any]]:
    return {name: resource.to_dict() for name, resource in resources.items()}


def resources_from_dict(data: Mapping[str, Mapping[str, Any]]) -> NamedResources:
    return {name: resource_from_dict(value) for name, value in data.items()}


@dataclass
class ResourcesUpdate:
    """One published version of the named resources."""

    resources_id: str
    create_time: float
    update_time: float
    version: int
    resources: NamedResources


@dataclass(kw_only=True)
class ProxyLLM(LLM):
    """Agent Lightning's LLM behind its proxy, whose URL it rewrites per rollout. boltstream's router
    and capture proxy attribute requests by the rollout context instead, so the endpoint is used as is."""

    resource_type: ClassVar[str] = "proxy_llm"

    def with_attempted_rollout(self, rollout: Any) -> LLM:
        return LLM(
            endpoint=self.endpoint,
            model=self.model,
            api_key=self.api_key,
            sampling_parameters=dict(self.sampling_parameters),
        )
