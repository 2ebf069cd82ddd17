"""Strategies by name: ``register`` adds a class, ``strategy_class`` finds one."""

from typing import Callable, Dict, Type, TypeVar, Union

from torchrec_multihash.errors import MultiHashError
from torchrec_multihash.modules.strategies.base import Strategy
from torchrec_multihash.modules.strategies.names import StrategyName

_REGISTRY: Dict[StrategyName, Type[Strategy]] = {}
S = TypeVar("S", bound=Type[Strategy])


def register(name: StrategyName) -> Callable[[S], S]:
    """Class decorator: makes ``cls`` the strategy configs select with ``strategy=name``."""

    def add(cls: S) -> S:
        if name in _REGISTRY:
            raise ValueError(f"strategy {name!s} is registered twice ({_REGISTRY[name].__name__}, {cls.__name__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return add


def parse_strategy(value: Union[str, StrategyName]) -> StrategyName:
    """``value`` as a StrategyName; a ``MultiHashError`` listing the names for anything else."""
    try:
        return StrategyName(value)
    except ValueError:
        raise MultiHashError(f"strategy must be one of {[str(n) for n in StrategyName]}, got {value!r}") from None


def strategy_class(name: Union[str, StrategyName]) -> Type[Strategy]:
    """The class registered under ``name``."""
    key = parse_strategy(name)
    if key not in _REGISTRY:
        raise MultiHashError(f"strategy {key!s} has no registered class")
    return _REGISTRY[key]
