"""``edgeprune data list`` and ``edgeprune recipes list``: the built-in data sets and recipes. Torch-free."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="built-in data sets (keys such as stsb:dev) and where each resolves")
    p.add_argument("action", choices=["list"])
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    p.set_defaults(func=run_data)
    p = subparsers.add_parser("recipes", help="built-in compress recipes (--recipe NAME) and their measured results")
    p.add_argument("action", choices=["list"])
    p.add_argument("--json", action="store_true", help="print one JSON object as the last stdout line")
    p.set_defaults(func=run_recipes)


def run_data(args) -> int:
    from edgeprune.core.console import print_json_last
    from edgeprune.core.data_sources import SOURCES, describe_sources, where
    from edgeprune.core.paths import data_dir

    rows = [dict(row, resolves=where(SOURCES[row["key"]])) for row in describe_sources()]
    print(f"mirror folder: {data_dir()} ($EDGEPRUNE_DATA, else shared/data beside the checkout or the cwd)")
    for row in rows:
        print(f"{row['key']:22s} {row['description']}\n{'':22s} hub: {row['hub']}\n{'':22s} mirror file: "
              f"{row['mirror']}\n{'':22s} now: {row['resolves']}")
    if args.json:
        print_json_last({"data": rows})
    return 0


def run_recipes(args) -> int:
    from edgeprune.core.console import print_json_last
    from edgeprune.core.recipe_catalog import list_recipes

    rows = list_recipes()
    for row in rows:
        print(f"{row['name']:24s} {row['summary']}\n{'':24s} measured: {row['measured']}")
    print("use: edgeprune compress MODEL -o OUT --recipe NAME (flags given on the command line override it)")
    if args.json:
        print_json_last({"recipes": rows})
    return 0
