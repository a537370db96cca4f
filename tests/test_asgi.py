"""The path below a mount point, read as Starlette's router reads it (the admin API and /gateway
match their routes on it)."""

import pytest

from middleware.asgi import route_path


@pytest.mark.parametrize(
    ("path", "root_path", "expected"),
    [
        ("/admin/users", "/admin", "/users"),
        ("/admin", "/admin", ""),
        ("/admin/", "/admin", "/"),
        ("/adminx/users", "/admin", "/adminx/users"),  # a longer segment is not below the mount
        ("/users", "", "/users"),
        ("/other", "/admin", "/other"),
    ],
)
def test_route_path_takes_the_mount_point_off_whole_segments_only(path: str, root_path: str, expected: str) -> None:
    assert route_path({"path": path, "root_path": root_path}) == expected
