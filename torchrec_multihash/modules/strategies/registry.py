"""Strategies by name: ``register`` adds a class, ``strategy_class`` finds one."""

from typing import Callable, Dict, List, Type, TypeVar, Union

from torchrec_multihash.errors import MultiHashError
from torchrec_multihash.modules.strategies.base import Strategy
from torchrec_multihash.modules.strategies.names import StrategyName

_REGISTRY: Dict[str, Type[Strategy]] = {}
S = TypeVar("S", bound=Type[Strategy])


def register(name: Union[StrategyName, str]) -> Callable[[S], S]:
    """Class decorator: makes ``cls`` the strategy that configs select with ``strategy=name``.
    Built-in strategies use their ``StrategyName``; a strategy of your own, any new name."""

    def add(cls: S) -> S:
        key = str(name)
        if key in _REGISTRY:
            raise ValueError(f"strategy '{key}' is registered twice ({_REGISTRY[key].__name__}, {cls.__name__})")
        cls.name = key
        _REGISTRY[key] = cls
        return cls

    return add


def registered_strategies() -> List[str]:
    """The names configs may use: the built-in ones in ``StrategyName`` order, then your own."""
    built_in = [str(n) for n in StrategyName]
    return [n for n in built_in if n in _REGISTRY] + [n for n in _REGISTRY if n not in built_in]


def parse_strategy(value: Union[StrategyName, str]) -> Union[StrategyName, str]:
    """``value`` as a StrategyName (or the name of a registered strategy of your own); a
    ``MultiHashError`` listing the names for anything else."""
    try:
        return StrategyName(value)
    except ValueError:
        if isinstance(value, str) and value in _REGISTRY:
            return value
        raise MultiHashError(f"strategy must be one of {registered_strategies()}, got {value!r}") from None


def strategy_class(name: Union[StrategyName, str]) -> Type[Strategy]:
    """The class registered under ``name``."""
    key = str(parse_strategy(name))
    if key not in _REGISTRY:
        raise MultiHashError(f"strategy '{key}' has no registered class")
    return _REGISTRY[key]
