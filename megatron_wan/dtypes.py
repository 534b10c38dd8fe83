"""The dtype names of the project, in one table: the short names command lines and configs use (fp32, bf16, fp16)
and the codes shard indexes store on disk (torch's attribute names, e.g. "bfloat16"; existing shards keep reading)."""

import torch

_TABLE = (  # (dtype, shard code, short name)
    (torch.bool, "bool", None), (torch.uint8, "uint8", None), (torch.int8, "int8", None),
    (torch.int16, "int16", None), (torch.int32, "int32", None), (torch.int64, "int64", None),
    (torch.float16, "float16", "fp16"), (torch.bfloat16, "bfloat16", "bf16"), (torch.float32, "float32", "fp32"),
    (torch.float64, "float64", None))

DTYPES = {name: dtype for dtype, _, name in _TABLE if name}  # short name -> dtype (command-line choices)
TRAINING = ("bf16", "fp32")  # run.dtype: bf16 autocast over fp32 weights, or fp32 throughout
SHARD_CODES = {code: dtype for dtype, code, _ in _TABLE}  # shard index code -> dtype
SHARD_CODE = {dtype: code for code, dtype in SHARD_CODES.items()}  # dtype -> shard index code
