"""GraphQL plumbing shared by the fake upstream and the mirror's own `/graphql`: one schema file
(mirrord/upstream.graphql), one parse-and-validate cache, upstream's error codes, and the fast
path for big hash lists."""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

from graphql import (
    DocumentNode,
    GraphQLError,
    GraphQLSchema,
    OperationDefinitionNode,
    build_schema,
    parse,
    print_ast,
    validate,
)

Item = dict[str, Any]

# A query with thousands of inline hashes is never asked twice: it must not evict the sync
# engine's two query strings from the cache.
_MAX_CACHED_QUERY = 64 * 1024


def build_upstream_schema() -> GraphQLSchema:
    """A fresh schema from the one SDL file; callers that attach resolvers get their own."""
    sdl = resources.files("mirrord").joinpath("upstream.graphql").read_text(encoding="utf-8")
    return build_schema(sdl)


@functools.cache
def schema() -> GraphQLSchema:
    """The schema as written, never mutated: what documents are validated against."""
    return build_upstream_schema()


def coded(error: GraphQLError, code: str) -> Item:
    """A formatted GraphQL error carrying `extensions.code`, as upstream's server sends them."""
    formatted: Item = dict(error.formatted)
    formatted["extensions"] = {**formatted.get("extensions", {}), "code": code}
    return formatted


def prepare(query: str, max_tokens: int | None = None) -> DocumentNode | tuple[Item, ...]:
    """Parse and validate, as real servers do, once per distinct query string; a tuple of
    coded errors when the query is not valid (or has more than `max_tokens` tokens)."""
    if len(query) > _MAX_CACHED_QUERY:
        return _prepare_uncached(query, max_tokens)
    return _prepare_cached(query, max_tokens)


def _prepare_uncached(query: str, max_tokens: int | None = None) -> DocumentNode | tuple[Item, ...]:
    try:
        document = parse(query, max_tokens=max_tokens)
    except GraphQLError as error:
        return (coded(error, "GRAPHQL_PARSE_FAILED"),)
    errors = validate(schema(), document)
    if errors:
        return tuple(coded(e, "GRAPHQL_VALIDATION_FAILED") for e in errors)
    return document


_prepare_cached = functools.lru_cache(maxsize=256)(_prepare_uncached)


def operation_of(document: DocumentNode, name: str | None) -> OperationDefinitionNode | None:
    operations = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
    named = (o for o in operations if o.name and o.name.value == name)
    return next(named, operations[0] if len(operations) == 1 and name is None else None)


def take_hash_lists(
    operation: OperationDefinitionNode | None, variables: dict[str, Any] | None
) -> tuple[dict[str, Any] | None, dict[str, list[str]]]:
    """Take big `[String!]!` variables out of graphql-core's hands when they are plainly valid.

    graphql-core coerces a list variable at ~2.5 µs per item: a quarter of a second for the
    100,000 hashes of one request. For a list of str it would return the very same strings,
    so those are kept aside (by variable name) and graphql-core coerces `[]` in their place
    (still checked against the declared type). Anything else, valid or not, is left to
    graphql-core, so every error is still its own.
    """
    taken: dict[str, list[str]] = {}
    if operation is None or not variables:
        return variables, taken
    for definition in operation.variable_definitions or ():
        name = definition.variable.name.value
        value = variables.get(name)
        if (
            type(value) is list
            and print_ast(definition.type) == "[String!]!"
            and all(type(item) is str for item in value)
        ):
            taken[name] = value
    if not taken:
        return variables, taken
    return {**variables, **{name: [] for name in taken}}, taken
