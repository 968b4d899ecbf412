"""A plain record for the wire's events: fields in `__slots__`, defaults in `_defaults`.

Hand-rolled rather than dataclasses because every store-* command imports the protocol,
and `dataclasses` (through `inspect`) would cost each of them ~10 ms of start-up.
"""


class Record:
    """Positional or keyword fields, in `__slots__` order; equal when of one type with
    equal fields."""

    __slots__: tuple[str, ...] = ()
    # Read, never written: each record's own are copied where mutable.
    _defaults: dict[str, object] = {}  # noqa: RUF012

    def __init__(self, *args: object, **kwargs: object) -> None:
        names = self.__slots__
        if not kwargs and len(args) == len(names):
            for name, value in zip(names, args, strict=True):
                setattr(self, name, value)
            return
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__} takes at most {len(names)} fields")
        values = dict(zip(names, args, strict=False))
        for key, value in kwargs.items():
            if key not in names or key in values:
                raise TypeError(f"{type(self).__name__}: bad field {key!r}")
            values[key] = value
        for name in names:
            if name in values:
                setattr(self, name, values[name])
            elif name in self._defaults:
                default = self._defaults[name]
                setattr(self, name, dict(default) if isinstance(default, dict) else default)
            else:
                raise TypeError(f"{type(self).__name__}: missing field {name!r}")

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, n) for n in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self._values() == other._values()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), repr(self._values())))

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)
        return f"{type(self).__name__}({fields})"
