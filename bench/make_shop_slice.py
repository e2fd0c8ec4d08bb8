"""Regenerate the demo shop's data: a slice of UCI Online Retail (cartwise/data, docs/demo-data.md).

    python -m bench.make_shop_slice [--products 300] [--invoices 3000] [--data-dir DIR]

Reads the shared log (cartwise.datasets.data_dir(), or --data-dir) and writes
cartwise/data/online_retail_slice/products.csv and invoices.csv.gz. Deterministic: the same
log and knobs give byte-identical files (gzip without a time stamp), so a diff shows a change.

How products are chosen, so that carting one shows believable complements:
1. Lines that are not sales of a product are dropped: cancellations (invoice "C..."),
   returns (quantity <= 0), free lines (price 0), postage, carriage, fees and manual
   adjustments (stock codes that do not start with five digits), and invoices without a
   customer (the demo's shoppers are the customer ids).
2. Each product gets a readable name (`display_name`) and a category from its description's
   keywords (`category_of`).
3. Two products are linked when at least `--min-support` invoices hold both. A product's score
   is its number of links to products of *other* categories (complements), plus half its
   links inside its own category (often substitutes: a lunch bag of another design). The
   `--products` best-scored products are kept.
4. Invoices are restricted to the kept products; those left with 2 to `--max-lines` lines are
   kept, the latest `--invoices` of them (a contiguous stretch of the log's last months).
The catalog price is the product's most common unit price in the kept lines; every line
keeps its own real price and quantity.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import itertools
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cartwise import datasets

OUT = Path(__file__).resolve().parents[1] / "cartwise" / "data" / "online_retail_slice"
SOURCE = Path("online_retail") / "online_retail_2010-12-01_to_2011-10-31.csv.gz"

# First match wins: seasonal and specific keywords before generic ones ("CHRISTMAS T-LIGHT"
# is Christmas, "PAPER NAPKINS" is Kitchen before "PAPER" makes it Stationery).
CATEGORY_KEYWORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Christmas", ("CHRISTMAS", "XMAS", "ADVENT", "SANTA", "REINDEER", "NATIVITY")),
    ("Doormats", ("DOORMAT",)),
    ("Bags", ("BAG", "BAGS", "SHOPPER", "TOTE")),
    ("Party", ("PARTY", "BUNTING", "BALLOONS", "BIRTHDAY", "GARLAND", "PINATA", "CONFETTI",
               "POPCORN", "CRACKERS")),
    ("Candles & Lights", ("T-LIGHT", "T-LIGHTS", "TEALIGHT", "CANDLE", "CANDLES", "LANTERN",
                          "LIGHT", "LIGHTS", "LAMP", "NIGHTLIGHT")),
    ("Hot Water Bottles & Warmers", ("HOT WATER", "HOTTIE", "WARMER", "WARMERS")),
    ("Garden", ("GARDEN", "GARDENERS", "WATERING", "PLANT", "PLANTER", "HERB", "KNEELING",
                "FLOWER POT", "BIRD HOUSE", "BIRDHOUSE", "FEEDER", "SEED")),
    ("Baking", ("CAKE", "CAKES", "CAKESTAND", "BAKING", "COOKIE", "CUTTER", "CUTTERS",
                "MOULD", "MOULDS", "ICING", "APRON", "OVEN", "SCALES", "RECIPE", "CUPCAKE")),
    ("Kitchen", ("MUG", "MUGS", "CUP", "CUPS", "TEACUP", "SAUCER", "PLATE", "PLATES", "BOWL",
                 "BOWLS", "NAPKINS", "CUTLERY", "BEAKER", "JUG", "TEAPOT", "TEA", "COFFEE",
                 "SUGAR", "MILK", "BREAD", "EGG", "JAM", "JAR", "JARS", "LUNCH", "PICNIC",
                 "KITCHEN", "PANTRY", "TRAY", "COASTER", "COASTERS", "PLACEMATS", "TOWEL",
                 "TOWELS", "BOTTLE", "CHOPSTICKS", "STRAWS", "DOILIES", "SNACK", "BISCUIT",
                 "TUMBLER", "GLASS", "GLASSES", "DISH")),
    ("Toys & Games", ("TOY", "TOYS", "GAME", "GAMES", "DOLL", "DOLLS", "PLAYHOUSE",
                      "DOMINOES", "JIGSAW", "SKIPPING", "SOLDIER", "SPINNING", "TEDDY",
                      "MONEY BOX", "FELTCRAFT", "BLOCK", "PUZZLE", "HARMONICA", "SNAP",
                      "BINGO", "GLIDERS", "PAINT", "COLOURING", "KNITTING", "SEWING")),
    ("Accessories", ("PURSE", "WALLET", "UMBRELLA", "NECKLACE", "BRACELET", "EARRINGS",
                     "HAIR", "KEYRING", "KEY RING", "FOB", "PASSPORT", "SCARF", "HAT",
                     "GLOVES", "BROOCH", "RING", "COMPACT MIRROR", "PLASTERS", "PARASOL")),
    ("Stationery & Wrap", ("CARD", "CARDS", "WRAP", "PAPER", "PENCIL", "PENCILS", "PEN",
                           "PENS", "NOTEBOOK", "SKETCHBOOK", "STICKER", "STICKERS", "TAGS",
                           "ENVELOPES", "RIBBON", "RIBBONS", "TISSUES", "BOOK", "NOTE",
                           "ERASER", "RULER", "CRAYONS", "CHALK", "STAMP")),
    ("Wall Decor", ("SIGN", "FRAME", "CLOCK", "PHOTO", "MAGNET", "MAGNETS", "PLAQUE",
                    "CHALKBOARD", "BLACK BOARD", "MEMO", "MIRROR", "POSTER", "WALL")),
    ("Home Decor", ("HEART", "HEARTS", "WICKER", "CUSHION", "HOOK", "HOOKS", "KNOB", "KNOBS",
                    "DRAWERKNOB", "DECORATION", "ORNAMENT", "VASE", "HOLDER", "HANGING",
                    "BLANKET", "THROW", "DOORSTOP", "BELL", "WREATH", "RACK", "PEGS")),
    ("Storage", ("BOX", "BOXES", "TIN", "TINS", "STORAGE", "BASKET", "CRATE", "DRAWER",
                 "CABINET", "CONTAINER", "CASE", "CASES", "CHEST")),
)
FALLBACK_CATEGORY = "Gifts"
_PATTERNS = tuple((name, re.compile(r"(?<![A-Z])(?:" + "|".join(map(re.escape, words))
                                    + r")(?![A-Z])"))
                  for name, words in CATEGORY_KEYWORDS)
# Kept in capitals; small words lower case inside a name; the log's abbreviations spelt out.
_ACRONYMS = {"LED", "UK", "USA", "DVD", "CD", "PHD", "GB", "NYC", "LP"}
_SMALL = {"of", "and", "with", "in", "on", "the", "a", "an", "for", "to", "or", "by", "at"}
_ABBREVIATIONS = {"ASSTD": "ASSORTED", "ANT": "ANTIQUE", "S/3": "SET/3", "S/4": "SET/4",
                  "S/6": "SET/6", "SML": "SMALL", "LRG": "LARGE"}


def category_of(description: str) -> str:
    """A readable category from a product description's keywords (first rule that matches).

    >>> category_of("LUNCH BAG RED RETROSPOT"), category_of("REGENCY CAKESTAND 3 TIER")
    ('Bags', 'Baking')
    """
    text = description.upper()
    for name, pattern in _PATTERNS:
        if pattern.search(text):
            return name
    return FALLBACK_CATEGORY


def _word(word: str, first: bool) -> str:
    if word.upper() in _ACRONYMS:
        return word.upper()
    low = word.lower()
    if not first and low in _SMALL:
        return low
    # Capitalise each part after a hyphen or slash ("T-LIGHT" -> "T-Light"); an apostrophe
    # keeps what follows lower case ("GIRL'S" -> "Girl's", "50'S" -> "50's").
    return re.sub(r"(^|[-/(+])([a-z])", lambda m: m.group(1) + m.group(2).upper(), low)


def display_name(description: str) -> str:
    """A description in capitals as a shop would print it: title case, tidy spacing.

    >>> display_name("  DOLLY GIRL'S LUNCH BOX  "), display_name("SET OF 3 CAKE TINS PANTRY DESIGN")
    ("Dolly Girl's Lunch Box", 'Set of 3 Cake Tins Pantry Design')
    >>> display_name("WHITE HANGING HEART T-LIGHT HOLDER")
    'White Hanging Heart T-Light Holder'
    """
    text = re.sub(r"\s+", " ", description.replace(".", " ").replace(",", ", ")).strip()
    text = re.sub(r"\s+,", ",", text)
    text = re.sub(r"\bOF(\d)", r"OF \1", text.upper())  # "SET OF4" -> "SET OF 4"
    words = [_ABBREVIATIONS.get(w, w) for w in text.split(" ")]
    return " ".join(_word(w, n == 0) for n, w in enumerate(words))


@dataclass(frozen=True)
class SaleLine:
    invoice: str
    customer: str
    ts: str  # "YYYY-MM-DD HH:MM:SS", as in the log
    item_id: str
    quantity: int
    price: float


def read_sales(path: Path) -> tuple[list[SaleLine], dict[str, Counter[str]]]:
    """The log's sale lines of products by known customers, and each code's descriptions."""
    lines: list[SaleLine] = []
    descriptions: dict[str, Counter[str]] = defaultdict(Counter)
    with io.TextIOWrapper(gzip.open(path), encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            invoice, code = row["InvoiceNo"], row["StockCode"].strip().upper()
            qty, price = int(row["Quantity"]), float(row["UnitPrice"])
            customer = row["CustomerID"].split(".")[0]
            if (invoice.startswith("C") or qty <= 0 or price <= 0 or not customer
                    or not code[:5].isdigit()):
                continue
            descriptions[code][row["Description"].strip()] += 1
            lines.append(SaleLine(invoice, customer, row["InvoiceDate"], code, qty, price))
    return lines, descriptions


def _baskets(lines: Iterable[SaleLine]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for ln in lines:
        out[ln.invoice].add(ln.item_id)
    return out


def choose_products(baskets: dict[str, set[str]], category: dict[str, str], n: int,
                    min_support: int, max_lines: int) -> list[str]:
    """The `n` best-connected products (module docstring, step 3), best first."""
    pairs: Counter[tuple[str, str]] = Counter()
    for items in baskets.values():
        if len(items) <= max_lines:
            pairs.update(itertools.combinations(sorted(items), 2))
    score: Counter[str] = Counter()
    for (a, b), count in pairs.items():
        if count >= min_support:
            w = 1.0 if category[a] != category[b] else 0.5
            score[a] += w
            score[b] += w
    return [item for item, _ in sorted(score.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def make_slice(lines: list[SaleLine], descriptions: dict[str, Counter[str]], products: int,
               invoices: int, min_support: int, max_lines: int
               ) -> tuple[list[dict[str, str]], list[SaleLine]]:
    """(catalog rows, kept sale lines in time order) of the slice."""
    names = {code: display_name(d.most_common(1)[0][0]) for code, d in descriptions.items()}
    category = {code: category_of(d.most_common(1)[0][0]) for code, d in descriptions.items()}
    chosen = set(choose_products(_baskets(lines), category, products, min_support, max_lines))
    by_invoice: dict[str, list[SaleLine]] = defaultdict(list)
    for ln in lines:
        if ln.item_id in chosen:
            by_invoice[ln.invoice].append(ln)
    # A repeated code within an invoice counts once (as in cartwise.datasets): quantities add.
    merged: dict[str, list[SaleLine]] = {}
    for inv, group in by_invoice.items():
        seen: dict[str, SaleLine] = {}
        for ln in group:
            old = seen.get(ln.item_id)
            seen[ln.item_id] = ln if old is None else SaleLine(
                inv, ln.customer, old.ts, ln.item_id, old.quantity + ln.quantity, old.price)
        if 2 <= len(seen) <= max_lines:
            merged[inv] = list(seen.values())
    latest = sorted(merged, key=lambda inv: (merged[inv][0].ts, inv))[-invoices:]
    kept = [ln for inv in latest for ln in merged[inv]]
    prices: dict[str, Counter[float]] = defaultdict(Counter)
    for ln in kept:
        prices[ln.item_id][ln.price] += 1
    catalog = [{"item_id": code, "name": names[code], "category": category[code],
                "price": f"{max(c.items(), key=lambda kv: (kv[1], -kv[0]))[0]:.2f}"}
               for code, c in sorted(prices.items())]
    return catalog, kept


def write(out: Path, catalog: list[dict[str, str]], kept: list[SaleLine]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "products.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, ["item_id", "name", "category", "price"], lineterminator="\n")
        w.writeheader()
        w.writerows(catalog)
    buf = io.StringIO()
    w2 = csv.writer(buf, lineterminator="\n")
    w2.writerow(["invoice", "customer", "ts", "item_id", "quantity", "price"])
    for ln in kept:
        w2.writerow([ln.invoice, ln.customer, ln.ts, ln.item_id, min(ln.quantity, 10_000),
                     f"{ln.price:g}"])
    with open(out / "invoices.csv.gz", "wb") as raw, \
            gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=9) as gz:
        gz.write(buf.getvalue().encode())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--products", type=int, default=300)
    p.add_argument("--invoices", type=int, default=3000)
    p.add_argument("--min-support", type=int, default=25,
                   help="invoices holding both products for a link (step 3)")
    p.add_argument("--max-lines", type=int, default=60,
                   help="larger invoices (wholesale restocks) do not count or replay")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    path = (args.data_dir or datasets.data_dir()) / SOURCE
    if not path.exists():
        print(f"make_shop_slice: {path} not found; set CARTWISE_DATA_DIR or pass --data-dir "
              "(the folder holding online_retail/)", file=sys.stderr)
        return 2
    lines, descriptions = read_sales(path)
    catalog, kept = make_slice(lines, descriptions, args.products, args.invoices,
                               args.min_support, args.max_lines)
    write(args.out, catalog, kept)
    invoices = len({ln.invoice for ln in kept})
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    cats = Counter(row["category"] for row in catalog)
    print(f"{len(catalog)} products, {invoices} invoices, {len(kept)} lines, "
          f"{len({ln.customer for ln in kept})} customers, {kept[0].ts} to {kept[-1].ts}, "
          f"{size / 1024:.0f} KiB in {args.out.name}/")
    print("categories: " + ", ".join(f"{c} {n}" for c, n in cats.most_common()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
