"""Reads a GGUF file with llama.cpp's gguf-py and prints what it found as JSON.

gguf-py parses the header, metadata and tensor table itself. It does not know
bitnet.cpp's I2_S (type 36, absent upstream), so tensor data views are not
built (the table is taken from gguf-py's own tensor-info fields); for TQ1_0
and TQ2_0 tensors the data is dequantized with gguf.quants and quantized again,
and the script reports whether the bytes come back identical.
"""
import json
import sys

import numpy as np
from gguf import GGUFReader, GGMLQuantizationType
from gguf import quants


class TableReader(GGUFReader):
    """gguf-py's reader, keeping the raw tensor table for every type id."""

    def _build_tensors(self, start_offs, fields):
        self.table = []
        for field in fields:
            _, name, _, dims, raw_type, offset = field.parts
            self.table.append({
                "name": bytes(name).decode("utf-8"),
                "dims": [int(d) for d in dims],
                "type": int(raw_type[0]),
                "offset": int(offset[0]),
            })


def main(path):
    r = TableReader(path)
    out = {
        "metadata": {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")},
        "tensors": r.table,
        "data_offset": int(r.data_offset),
        "quants": {},
    }
    known = {int(t) for t in (GGMLQuantizationType.TQ1_0, GGMLQuantizationType.TQ2_0)}
    if all(t["type"] != 36 for t in r.table):
        full = GGUFReader(path)
        for t in full.tensors:
            if int(t.tensor_type) not in known:
                continue
            raw = np.array(t.data)
            values = quants.dequantize(raw, t.tensor_type)
            again = quants.quantize(values, t.tensor_type)
            flat = values.reshape(-1)
            out["quants"][t.name] = {
                "requantized_identical": bool(np.array_equal(again.reshape(-1), raw.reshape(-1))),
                "first": [float(x) for x in flat[:300]],
                "sum": float(flat.astype(np.float64).sum()),
            }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])
