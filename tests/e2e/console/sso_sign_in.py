#!/usr/bin/python3
"""The web console's identity-provider sign-in, as the console page's htmx does it: start it,
print the sign-in link and code (the e2e test signs the person in at the provider), poll
until the console answers with a session, then open the nodes page with that session.

Environment: LATTICE_CONSOLE_URL (https://HOST:PORT of the admin listener).
Prints `link URL CODE`, then `actor NAME` as the signed-in page names it.
"""

import html
import os
import re
import ssl
import sys
import time
import urllib.error
import urllib.request

URL = os.environ["LATTICE_CONSOLE_URL"]
CTX = ssl.create_default_context()
CTX.check_hostname = False
CTX.verify_mode = ssl.CERT_NONE


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


OPENER = urllib.request.build_opener(urllib.request.HTTPSHandler(context=CTX), NoRedirect)


def call(method, path, cookies):
    req = urllib.request.Request(f"{URL}{path}", method=method, data=b"" if method == "POST" else None)
    req.add_header("HX-Request", "true")
    if method == "POST":
        req.add_header("Origin", URL)
        req.add_header("Sec-Fetch-Site", "same-origin")
    if cookies:
        req.add_header("Cookie", "; ".join(f"{k}={v}" for k, v in cookies.items()))
    try:
        with OPENER.open(req) as r:
            status, headers, body = r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        status, headers, body = e.code, e.headers, e.read().decode()
    for c in headers.get_all("Set-Cookie") or []:
        name, _, rest = c.partition("=")
        value = rest.split(";")[0]
        if value:
            cookies[name] = value
        else:
            cookies.pop(name, None)
    return status, headers, body


def main():
    cookies = {}
    status, _, body = call("POST", "/console/login/sso", cookies)
    if status != 200 or "__Host-lattice_console_sso" not in cookies:
        sys.exit(f"starting the sign-in: {status} {body}")
    link = html.unescape(re.search(r'<a href="([^"]+)"', body).group(1))
    code = re.search(r'<strong class="code">([^<]+)</strong>', body).group(1)
    print(f"link {link} {code}", flush=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        status, headers, body = call("POST", "/console/login/sso/poll", cookies)
        if status != 204:
            sys.exit(f"polling: {status} {body}")
        if headers.get("HX-Redirect") == "/console/nodes":
            break
        time.sleep(1)
    else:
        sys.exit("the console never saw the sign-in")
    if "__Host-lattice_console" not in cookies or "__Host-lattice_console_sso" in cookies:
        sys.exit(f"no session cookie after the sign-in: {sorted(cookies)}")
    status, _, body = call("GET", "/console/nodes", cookies)
    if status != 200:
        sys.exit(f"the nodes page: {status}")
    who = re.search(r'<span class="who">([^<]+)</span>', body).group(1)
    print(f"actor {html.unescape(who)}", flush=True)


if __name__ == "__main__":
    main()
