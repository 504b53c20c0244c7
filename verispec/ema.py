"""The exponential moving average that measured times and rates are kept as (the pools' pass times, the stepper's,
the cost model's, the draft length choosers'): below everything that measures."""


def ema(old: float | None, new: float, weight: float) -> float:
    """Exponential moving average; the first value (old None) is taken as it is."""
    return new if old is None else (1 - weight) * old + weight * new
