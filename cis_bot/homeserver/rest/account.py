"""Accounts and per-user data: versions, login/logout, register (appservice only), whoami,
capabilities, profile, filters, account data, push rules."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cis_bot.homeserver import room_versions
from cis_bot.homeserver.errors import (
    FORBIDDEN,
    INVALID_PARAM,
    MISSING_PARAM,
    MatrixError,
    bad_request,
    forbidden,
    not_found,
)
from cis_bot.homeserver.filtering import cap_timeline_limit, validate_filter
from cis_bot.homeserver.ids import split_id
from cis_bot.homeserver.rest.base import INT64_MAX

if TYPE_CHECKING:
    from cis_bot.homeserver.rest.base import RestRequest, Router

Result = tuple[int, Any]

SPEC_VERSIONS = [
    "r0.0.1",
    "r0.1.0",
    "r0.2.0",
    "r0.3.0",
    "r0.4.0",
    "r0.5.0",
    "r0.6.0",
    "r0.6.1",
    *(f"v1.{minor}" for minor in range(1, 16)),
]
APPSERVICE_LOGIN = "m.login.application_service"
PASSWORD_LOGIN = "m.login.password"


# What clients probe before using a feature: true for what this server does, false (as Synapse
# says it) for what clients would otherwise try: sliding sync, busy presence, login tokens.
UNSTABLE_FEATURES = {
    "org.matrix.e2e_cross_signing": True,
    "org.matrix.msc2285.stable": True,
    "org.matrix.msc2432": True,
    "org.matrix.msc3440.stable": True,
    "fi.mau.msc2659.stable": True,
    "org.matrix.msc3026.busy_presence": False,
    "org.matrix.msc3882": False,
    "org.matrix.simplified_msc3575": False,
}


async def versions(request: RestRequest) -> Result:
    return 200, {"versions": SPEC_VERSIONS, "unstable_features": UNSTABLE_FEATURES}


async def login_flows(request: RestRequest) -> Result:
    return 200, {"flows": [{"type": PASSWORD_LOGIN}, {"type": APPSERVICE_LOGIN}]}


def _identifier_user(body: dict[str, Any]) -> str:
    """Synapse's convert_client_dict_legacy_fields_to_identifier, m.id.user only."""
    identifier = body.get("identifier", {})
    if body.get("user"):
        identifier = {"type": "m.id.user", "user": body["user"]}
    if body.get("medium") and body.get("address"):
        raise MatrixError(403, FORBIDDEN, "Invalid username or password")
    if not identifier:
        raise bad_request("Invalid login submission", INVALID_PARAM)
    if not isinstance(identifier, dict) or "type" not in identifier:
        raise bad_request("'identifier' dict has no key 'type'", MISSING_PARAM)
    if identifier["type"] != "m.id.user":
        raise bad_request("Unknown login identifier type")
    user = identifier.get("user")
    if not user:
        raise bad_request("User identifier is missing 'user' key")
    if not isinstance(user, str):
        raise bad_request("Invalid user in identifier", INVALID_PARAM)
    return user


async def login(request: RestRequest) -> Result:
    hs = request.hs
    body = await request.json()
    login_type = body.get("type")
    if not isinstance(login_type, str):
        if "type" not in body:
            raise bad_request("Missing JSON keys.")
        raise bad_request("Bad parameter: type", INVALID_PARAM)
    device_id = body.get("device_id")
    if device_id is not None and (not isinstance(device_id, str) or len(device_id) > 512):
        raise bad_request("device_id cannot be longer than 512 characters.", INVALID_PARAM)
    display_name = body.get("initial_device_display_name")
    if display_name is not None and not isinstance(display_name, str):
        display_name = None
    limits = hs.login_ratelimiter
    if login_type == APPSERVICE_LOGIN:
        requester = request.auth()
        service = requester.appservice
        if service is None:
            raise MatrixError(
                401, "M_UNKNOWN_TOKEN", "This login method is only valid for application services"
            )
        if service.rate_limited:
            limits.address.ratelimit(request.raw.peer)
        identifier = body.get("identifier")
        if not isinstance(identifier, dict):
            raise bad_request("Invalid identifier in login submission", INVALID_PARAM)
        if identifier.get("type") != "m.id.user":
            raise bad_request("Unknown login identifier type", INVALID_PARAM)
        user = identifier.get("user")
        if not isinstance(user, str):
            raise bad_request("Invalid user in identifier", INVALID_PARAM)
        user_id = user if user.startswith("@") else f"@{user}:{hs.server_name}"
        if not service.is_interested_in_user(user_id):
            raise MatrixError(403, FORBIDDEN, "Invalid access_token")
    else:
        # Synapse's order: the address limit counts every attempt, the failed-attempts limit is
        # checked before the password (and counts only failures), the account limit counts
        # successes.
        limits.address.ratelimit(request.raw.peer)
        password = body.get("password")
        if login_type == PASSWORD_LOGIN and not isinstance(password, str):
            raise bad_request("Bad parameter: password", INVALID_PARAM)
        user = _identifier_user(body)
        if login_type != PASSWORD_LOGIN:
            raise bad_request(f"Unknown login type {login_type}")
        assert isinstance(password, str)
        account = hs.auth.qualify(user).lower()
        limits.failed_attempts.ratelimit(account, update=False)
        try:
            user_id = await hs.auth.check_password(user, password)
        except MatrixError:
            limits.failed_attempts.can_do_action(account)
            raise
        limits.account.ratelimit(user_id.lower())
    device, token = hs.auth.new_session(user_id, device_id, display_name, request.raw.peer)
    return 200, {
        "user_id": user_id,
        "access_token": token,
        "home_server": hs.server_name,
        "device_id": device,
        "well_known": {"m.homeserver": {"base_url": f"{hs.base_url}/"}},
    }


async def logout(request: RestRequest) -> Result:
    requester = request.auth()
    if requester.appservice is not None:
        return 200, {}
    if requester.device_id is None:
        request.hs.auth.forget_tokens([requester.access_token])
    else:
        request.hs.devices.delete_devices(requester.user_id, [requester.device_id])
    return 200, {}


async def logout_all(request: RestRequest) -> Result:
    requester = request.auth()
    request.hs.devices.delete_all_devices(requester.user_id)
    request.hs.auth.forget_tokens(request.hs.store.delete_all_tokens(requester.user_id))
    return 200, {}


async def register(request: RestRequest) -> Result:
    hs = request.hs
    body = await request.json()
    kind = request.string("kind", "user")
    if kind == "guest":
        raise forbidden("Guest access is disabled")
    if kind != "user":
        raise MatrixError(400, "M_UNRECOGNIZED", f"Do not understand membership kind: {kind}")
    username = body.get("username")
    if "username" in body and (not isinstance(username, str) or len(username) > 512):
        raise bad_request("Invalid username")
    if body.get("type") == APPSERVICE_LOGIN:
        if not request.has_token():
            raise bad_request(
                "Appservice token must be provided when using a type of m.login.application_service"
            )
        token = request.token()
        service = hs.auth.appservice_for_token(token)
        if username is None:
            raise bad_request("Desired Username is missing or not a string")
        if service is None:
            raise MatrixError(
                401, "M_UNKNOWN_TOKEN", "Invalid access token passed.", soft_logout=False
            )
        user_id = hs.auth.register_appservice_user(service, username)
        result: dict[str, Any] = {"user_id": user_id, "home_server": hs.server_name}
        if not body.get("inhibit_login", False):
            device_id = body.get("device_id")
            name = body.get("initial_device_display_name")
            device, access_token = hs.auth.new_session(
                user_id,
                device_id if isinstance(device_id, str) else None,
                name if isinstance(name, str) else None,
                request.raw.peer,
            )
            result.update({"access_token": access_token, "device_id": device})
        return 200, result
    if request.has_token():
        raise bad_request(
            "An access token should not be provided on requests to /register (except if type "
            "is m.login.application_service)"
        )
    raise forbidden("Registration has been disabled")


async def register_available(request: RestRequest) -> Result:
    raise forbidden("Registration has been disabled")


async def whoami(request: RestRequest) -> Result:
    requester = request.auth()
    body: dict[str, Any] = {"user_id": requester.user_id, "is_guest": False}
    if requester.device_id is not None:
        body["device_id"] = requester.device_id
    return 200, body


async def capabilities(request: RestRequest) -> Result:
    request.auth()
    return 200, {
        "capabilities": {
            "m.room_versions": {
                "default": room_versions.DEFAULT_ROOM_VERSION,
                "available": dict(room_versions.ADVERTISED_ROOM_VERSIONS),
            },
            "m.change_password": {"enabled": False},
            "m.set_displayname": {"enabled": True},
            "m.set_avatar_url": {"enabled": True},
            "m.3pid_changes": {"enabled": False},
            "m.get_login_token": {"enabled": False},
            "m.profile_fields": {"enabled": True},
        }
    }


# --- profile -------------------------------------------------------------------------------


def _profile_row(request: RestRequest, user_id: str) -> Any:
    try:
        split_id(user_id, "@")
    except ValueError:
        raise bad_request(f"Invalid user id: {user_id}", INVALID_PARAM) from None
    row = request.hs.store.get_user(user_id)
    if row is None:
        raise MatrixError(404, "M_UNKNOWN", "No row found (profiles)")
    return row


async def get_profile(request: RestRequest, user_id: str) -> Result:
    row = _profile_row(request, user_id)
    body: dict[str, Any] = {}
    if row.displayname is not None:
        body["displayname"] = row.displayname
    if row.avatar_url is not None:
        body["avatar_url"] = row.avatar_url
    return 200, body


async def get_profile_field(request: RestRequest, user_id: str, field: str) -> Result:
    row = _profile_row(request, user_id)
    if field not in ("displayname", "avatar_url"):
        raise not_found("The requested profile key does not exist.")
    value = getattr(row, field)
    if value is None:
        raise not_found("The requested profile key does not exist.")
    return 200, {field: value}


async def set_profile_field(request: RestRequest, user_id: str, field: str) -> Result:
    """Synapse's ProfileFieldRestServlet.on_PUT + ProfileHandler.set_displayname/avatar_url."""
    hs = request.hs
    try:
        _, server = split_id(user_id, "@")
    except ValueError:
        raise bad_request("Invalid user id", INVALID_PARAM) from None
    requester = request.auth()
    if field not in ("displayname", "avatar_url"):
        raise bad_request(f"Unsupported profile field {field}", INVALID_PARAM)
    body = await request.json()
    if field not in body:
        raise bad_request(f"Missing key '{field}'", MISSING_PARAM)
    value = body[field]
    if server != hs.server_name:
        raise bad_request("User is not hosted on this homeserver")
    if requester.user_id != user_id:
        raise MatrixError(400, FORBIDDEN, f"Cannot set another user's {field}")
    if not isinstance(value, str):
        raise bad_request(f"'{field}' must be a string", INVALID_PARAM)
    if field == "displayname" and len(value) > 256:
        raise bad_request("Displayname is too long (max 256)")
    if field == "avatar_url" and len(value) > 1000:
        raise bad_request("Avatar URL is too long (max 1000)")
    new_value: str | None = value.strip() if field == "displayname" else value
    if value == "":
        new_value = None
    hs.store.set_profile_field(user_id, field, new_value)
    hs.members.propagate_profile(requester, field, new_value)
    return 200, {}


# --- filters -------------------------------------------------------------------------------


async def create_filter(request: RestRequest, user_id: str) -> Result:
    requester = request.auth()
    if requester.user_id != user_id:
        raise forbidden("Cannot create filters for other users")
    if not user_id.endswith(f":{request.hs.server_name}"):
        raise forbidden("Can only create filters for local users")
    body = await request.json()
    cap_timeline_limit(body)
    validate_filter(body)
    filter_id = request.hs.store.add_filter(user_id, body)
    return 200, {"filter_id": str(filter_id)}


async def get_filter(request: RestRequest, user_id: str, filter_id: str) -> Result:
    requester = request.auth()
    if requester.user_id != user_id:
        raise forbidden("Cannot get filters for other users")
    try:
        number = int(filter_id)
    except ValueError:
        raise bad_request("Invalid filter_id") from None
    if not 0 <= number <= INT64_MAX:
        raise bad_request("Invalid filter_id")
    found = request.hs.store.get_filter(user_id, number)
    if found is None:
        raise not_found("No such filter")
    return 200, found


# --- account data --------------------------------------------------------------------------


def _account_data_owner(request: RestRequest, user_id: str) -> str:
    requester = request.auth()
    if requester.user_id != user_id:
        raise forbidden("Cannot add account data for other users.")
    return user_id


async def get_account_data(
    request: RestRequest, user_id: str, data_type: str, room_id: str = ""
) -> Result:
    requester = request.auth()
    if requester.user_id != user_id:
        raise forbidden("Cannot get account data for other users.")
    if room_id == "" and data_type == "m.push_rules":
        return 200, request.hs.push_rules.rules_for(user_id)
    content = request.hs.store.get_account_data(user_id, room_id, data_type)
    if not content:
        raise not_found("Account data not found")
    return 200, content


async def put_account_data(
    request: RestRequest, user_id: str, data_type: str, room_id: str = ""
) -> Result:
    _account_data_owner(request, user_id)
    body = await request.json()
    if data_type == "m.fully_read" and room_id:
        raise MatrixError(
            400,
            "M_BAD_JSON",
            "Cannot set m.fully_read through this API. Use /rooms/!roomId:server.name/read_markers",
        )
    if data_type == "m.push_rules" and not room_id:
        raise MatrixError(
            400, "M_BAD_JSON", "Cannot set m.push_rules through this API. Use /pushrules"
        )
    if room_id:
        try:
            split_id(room_id, "!")
        except ValueError:
            if not room_id.startswith("!"):
                raise bad_request(f"{room_id} is not a valid room ID", INVALID_PARAM) from None
    request.hs.store.set_account_data(user_id, room_id, data_type, body)
    request.hs.notifier.notify_users([user_id])
    return 200, {}


async def get_room_account_data(
    request: RestRequest, user_id: str, room_id: str, data_type: str
) -> Result:
    return await get_account_data(request, user_id, data_type, room_id)


async def put_room_account_data(
    request: RestRequest, user_id: str, room_id: str, data_type: str
) -> Result:
    return await put_account_data(request, user_id, data_type, room_id)


async def get_tags(request: RestRequest, user_id: str, room_id: str) -> Result:
    requester = request.auth()
    if requester.user_id != user_id:
        raise forbidden("Cannot get tags for other users.")
    content = request.hs.store.get_account_data(user_id, room_id, "m.tag") or {}
    return 200, {"tags": content.get("tags", {})}


async def put_tag(request: RestRequest, user_id: str, room_id: str, tag: str) -> Result:
    _account_data_owner(request, user_id)
    body = await request.json()
    content = request.hs.store.get_account_data(user_id, room_id, "m.tag") or {}
    tags = dict(content.get("tags", {}))
    tags[tag] = body
    request.hs.store.set_account_data(user_id, room_id, "m.tag", {"tags": tags})
    request.hs.notifier.notify_users([user_id])
    return 200, {}


async def delete_tag(request: RestRequest, user_id: str, room_id: str, tag: str) -> Result:
    _account_data_owner(request, user_id)
    content = request.hs.store.get_account_data(user_id, room_id, "m.tag") or {}
    tags = dict(content.get("tags", {}))
    tags.pop(tag, None)
    request.hs.store.set_account_data(user_id, room_id, "m.tag", {"tags": tags})
    request.hs.notifier.notify_users([user_id])
    return 200, {}


# --- push rules ----------------------------------------------------------------------------


async def get_push_rules(request: RestRequest, scope: str = "") -> Result:
    requester = request.auth()
    rules = request.hs.push_rules.rules_for(requester.user_id)
    if scope == "global":
        return 200, rules["global"]
    return 200, rules


async def push_rule(
    request: RestRequest, kind: str, rule_id: str, attr: str | None = None
) -> Result:
    requester = request.auth()
    handler = request.hs.push_rules
    method = request.method
    if method == "GET":
        rule = handler.find(requester.user_id, kind, rule_id)
        if attr is None:
            return 200, rule
        if attr in ("enabled", "actions"):
            return 200, {attr: rule.get(attr)}
        raise MatrixError(400, "M_UNRECOGNIZED", "Unrecognised request")
    if method == "DELETE":
        handler.delete_rule(requester.user_id, kind, rule_id)
        return 200, {}
    body = await request.json()
    if attr is None:
        handler.put_rule(requester.user_id, kind, rule_id, body)
    else:
        handler.set_attribute(requester.user_id, kind, rule_id, attr, body)
    return 200, {}


def register_routes(router: Router) -> None:
    router.add("GET", r"^/_matrix/client/versions", versions)
    router.client("GET", "/login", login_flows)
    router.client("POST", "/login", login)
    router.client("POST", "/logout", logout)
    router.client("POST", "/logout/all", logout_all)
    router.client("POST", "/register", register)
    router.client("GET", "/register/available", register_available)
    router.client("GET", "/account/whoami", whoami)
    router.client("GET", "/capabilities", capabilities)
    router.client("GET", "/profile/(?P<user_id>[^/]*)", get_profile)
    router.client("GET", "/profile/(?P<user_id>[^/]*)/(?P<field>[^/]*)", get_profile_field)
    router.client("PUT", "/profile/(?P<user_id>[^/]*)/(?P<field>[^/]*)", set_profile_field)
    router.client("POST", "/user/(?P<user_id>[^/]*)/filter", create_filter)
    router.client("GET", "/user/(?P<user_id>[^/]*)/filter/(?P<filter_id>[^/]*)", get_filter)
    router.client(
        "GET", "/user/(?P<user_id>[^/]*)/account_data/(?P<data_type>[^/]*)", get_account_data
    )
    router.client(
        "PUT", "/user/(?P<user_id>[^/]*)/account_data/(?P<data_type>[^/]*)", put_account_data
    )
    room_data = (
        "/user/(?P<user_id>[^/]*)/rooms/(?P<room_id>[^/]*)/account_data/(?P<data_type>[^/]*)"
    )
    router.client("GET", room_data, get_room_account_data)
    router.client("PUT", room_data, put_room_account_data)
    router.client("GET", "/user/(?P<user_id>[^/]*)/rooms/(?P<room_id>[^/]*)/tags", get_tags)
    tag = "/user/(?P<user_id>[^/]*)/rooms/(?P<room_id>[^/]*)/tags/(?P<tag>[^/]*)"
    router.client("PUT", tag, put_tag)
    router.client("DELETE", tag, delete_tag)
    router.client("GET", "/pushrules/?", get_push_rules)
    router.client("GET", "/pushrules/(?P<scope>global)/?", get_push_rules)
    rule = "/pushrules/global/(?P<kind>[^/]*)/(?P<rule_id>[^/]+)"
    for method in ("GET", "PUT", "DELETE"):
        router.client(method, rule, push_rule)
    for method in ("GET", "PUT"):
        router.client(method, rule + "/(?P<attr>enabled|actions)", push_rule)
