"""The ways a run refuses to start, or stops on purpose, with a message for the person who launched it.

A ``Refusal`` is reported once, by rank 0, as ``<label>: <message>`` without a traceback, and ends the process with
its ``exit_code`` (launch/pretrain_infifpo.py); any other exception is a failure and keeps its traceback. This
module imports nothing, so the entry point catches refusals before torch or Megatron are imported.
"""


class Refusal(Exception):
    label = "error"
    exit_code = 2
