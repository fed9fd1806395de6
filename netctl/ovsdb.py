"""ovsdbapp helpers shared by the OVN backend, the lab's OVS stack and the CNI binding."""

from __future__ import annotations

from typing import Any


def per_instance_connection(base: type[Any]) -> type[Any]:
    """A subclass of an ovsdbapp API class whose connection is per instance.

    ovsdbapp keeps the connection in a *class* attribute, so the first instance's connection
    wins for every later one; several databases (a restart test, a lab beside a test run, the
    NB and the Open_vSwitch DB) in one process need one each.
    """

    class PerInstance(base):
        @property
        def ovsdb_connection(self) -> Any:
            return self.__dict__["_netctl_conn"]

        @ovsdb_connection.setter
        def ovsdb_connection(self, conn: Any) -> None:
            self.__dict__["_netctl_conn"] = conn

    PerInstance.__name__ = PerInstance.__qualname__ = f"PerInstance{base.__name__}"
    return PerInstance
