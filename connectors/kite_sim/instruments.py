"""The simulator's instrument master: NSE and BSE cash equities plus the three headline indices.

The equity list ships as `data/instruments.csv` (NSE symbols and company names of the Nifty 500,
with a base price each). Both exchanges list every symbol. Tokens follow Kite's rule,
`instrument_token = (exchange_token << 8) | segment`, so `token & 0xFF` recovers the segment exactly as
the KiteTicker parser does.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

# Kite's segment ids (the low byte of an instrument_token).
SEGMENT_IDS: dict[str, int] = {
    "NSE": 1,
    "NFO": 2,
    "CDS": 3,
    "BSE": 4,
    "BFO": 5,
    "BCD": 6,
    "MCX": 7,
    "MCXSX": 8,
    "INDICES": 9,
}
INDEX_SEGMENT = SEGMENT_IDS["INDICES"]

CSV_HEADER = (
    "instrument_token,exchange_token,tradingsymbol,name,last_price,expiry,strike,"
    "tick_size,lot_size,instrument_type,segment,exchange"
)

TICK_PAISE = 5  # 0.05 rupees: the NSE/BSE cash tick.


def make_token(exchange_token: int, segment_id: int) -> int:
    return (exchange_token << 8) | segment_id


@dataclass(frozen=True, slots=True)
class Instrument:
    instrument_token: int
    exchange_token: int
    tradingsymbol: str
    name: str
    exchange: str  # NSE or BSE
    segment: str  # NSE, BSE or INDICES
    base_price_paise: int
    tick_paise: int = TICK_PAISE
    lot_size: int = 1
    instrument_type: str = "EQ"

    @property
    def key(self) -> str:
        """Kite's instrument key, "EXCHANGE:TRADINGSYMBOL"."""
        return f"{self.exchange}:{self.tradingsymbol}"

    @property
    def segment_id(self) -> int:
        return self.instrument_token & 0xFF

    @property
    def is_index(self) -> bool:
        return self.segment_id == INDEX_SEGMENT

    @property
    def tradable(self) -> bool:
        return not self.is_index

    def csv_row(self) -> str:
        # Indices carry tick_size 0 and lot_size 0 in Kite's dump; equities 0.05 and 1.
        tick = "0.0" if self.is_index else f"{self.tick_paise / 100:g}"
        last_price = f"{self.base_price_paise / 100:.2f}"
        return (
            f"{self.instrument_token},{self.exchange_token},{self.tradingsymbol},{_csv_field(self.name)},"
            f"{last_price},,0.0,{tick},{0 if self.is_index else self.lot_size},{self.instrument_type},"
            f"{self.segment},{self.exchange}"
        )


def _csv_field(value: str) -> str:
    if any(ch in value for ch in ',"\n'):
        return '"' + value.replace('"', '""') + '"'
    return value


# Index tokens as Kite publishes them: NIFTY 50 256265, NIFTY BANK 260105, SENSEX 265.
_INDICES: tuple[tuple[str, str, int, str, int], ...] = (
    ("NSE", "NIFTY 50", 1001, "NIFTY 50", 2_450_000),
    ("NSE", "NIFTY BANK", 1016, "NIFTY BANK", 5_200_000),
    ("BSE", "SENSEX", 1, "SENSEX", 8_050_000),
)


class InstrumentMaster:
    """Immutable lookup tables over a list of instruments; O(1) by key and by token."""

    def __init__(self, instruments: list[Instrument]) -> None:
        self.instruments: tuple[Instrument, ...] = tuple(instruments)
        self._by_key: dict[str, Instrument] = {}
        self._by_token: dict[int, Instrument] = {}
        for ins in self.instruments:
            if ins.key in self._by_key or ins.instrument_token in self._by_token:
                raise ValueError(f"duplicate instrument {ins.key} / {ins.instrument_token}")
            self._by_key[ins.key] = ins
            self._by_token[ins.instrument_token] = ins
        self._csv_cache: dict[str | None, bytes] = {}

    def __len__(self) -> int:
        return len(self.instruments)

    def by_key(self, key: str) -> Instrument | None:
        """Look up "EXCHANGE:SYMBOL" (e.g. "NSE:INFY")."""
        return self._by_key.get(key)

    def get(self, exchange: str, tradingsymbol: str) -> Instrument | None:
        return self._by_key.get(f"{exchange}:{tradingsymbol}")

    def by_token(self, instrument_token: int) -> Instrument | None:
        return self._by_token.get(instrument_token)

    def exchanges(self) -> set[str]:
        return {ins.exchange for ins in self.instruments}

    def csv_bytes(self, exchange: str | None = None) -> bytes:
        """The `/instruments` dump (Kite's exact header), cached: it never changes for a master."""
        cached = self._csv_cache.get(exchange)
        if cached is None:
            rows = [CSV_HEADER]
            rows.extend(i.csv_row() for i in self.instruments if exchange is None or i.exchange == exchange)
            cached = ("\n".join(rows) + "\n").encode()
            self._csv_cache[exchange] = cached
        return cached


def _rupees_to_paise(text: str) -> int:
    rupees, _, fraction = text.strip().partition(".")
    return int(rupees) * 100 + int((fraction + "00")[:2])


def parse_master_csv(text: str) -> list[Instrument]:
    """Parse the shipped data file (tradingsymbol,name,nse_exchange_token,bse_exchange_token,base_price)."""
    instruments: list[Instrument] = []
    for row in csv.DictReader(io.StringIO(text)):
        price = _rupees_to_paise(row["base_price"])
        price -= price % TICK_PAISE  # keep every base price on the tick grid
        for exchange, column in (("NSE", "nse_exchange_token"), ("BSE", "bse_exchange_token")):
            exchange_token = int(row[column])
            instruments.append(
                Instrument(
                    instrument_token=make_token(exchange_token, SEGMENT_IDS[exchange]),
                    exchange_token=exchange_token,
                    tradingsymbol=row["tradingsymbol"],
                    name=row["name"],
                    exchange=exchange,
                    segment=exchange,
                    base_price_paise=price,
                )
            )
    return instruments


def index_instruments() -> list[Instrument]:
    return [
        Instrument(
            instrument_token=make_token(exchange_token, INDEX_SEGMENT),
            exchange_token=exchange_token,
            tradingsymbol=symbol,
            name=name,
            exchange=exchange,
            segment="INDICES",
            base_price_paise=price,
        )
        for exchange, symbol, exchange_token, name, price in _INDICES
    ]


@lru_cache(maxsize=1)
def default_master() -> InstrumentMaster:
    """The shipped master: ~500 NSE equities, the same on BSE, and NIFTY 50 / NIFTY BANK / SENSEX."""
    text = resources.files("connectors.kite_sim.data").joinpath("instruments.csv").read_text("utf-8")
    return InstrumentMaster(parse_master_csv(text) + index_instruments())
