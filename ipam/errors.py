"""IPAM errors: each str() is one line a person can act on (pure)."""

from __future__ import annotations

from datastore.errors import TabbyError


class IPAMError(TabbyError):
    """Any IPAM failure; also raised when etcd stays too contended to finish a request."""


class PoolExhausted(IPAMError):
    """No free address could be found (or claimed) for the request."""


class NoMatchingPool(IPAMError):
    """No enabled pool is usable for this request (family, selectors, use, names asked for)."""


class AddressInUse(IPAMError):
    """A specific address was asked for but is already allocated."""


class NotInPool(IPAMError):
    """A specific address lies outside every enabled pool."""


class InvalidRequest(IPAMError):
    """The request itself is wrong (bad address, bad config, forbidden by strict affinity)."""


class AddressNotAllocated(IPAMError):
    """An address asked about is free, so it has no allocation to look at."""


class InputsChanged(IPAMError):
    """A request made from remembered inputs (`Prefetched.remembered`) had a write refused:
    what it remembered may be out of date, so the caller reads and asks again."""


class StaleSequenceNumber(IPAMError):
    """A release carried a sequence number that no longer matches the allocation: the address
    was released and handed out again since the caller looked (Calico's ABA guard)."""


class BlockNotEmpty(IPAMError):
    """An affinity was to be released only from an empty block, and the block is in use."""
