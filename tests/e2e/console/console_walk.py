#!/usr/bin/python3
"""Walks through the Lattice web console in a real browser (headless Chromium from Debian,
driven by Debian's python3-selenium), as an admin would.

Run by the e2e test `console::the_web_console_...` inside the coordinator's namespace; the test
starts the nodes when this script has written the auth key it created. Every step checks what
the page shows; the first failed check ends the walk with a non-zero exit and says which.

Environment:
  LATTICE_CONSOLE_URL    https://HOST:PORT of the admin listener
  LATTICE_CONSOLE_TOKEN  an admin token (write scope)
  LATTICE_CONSOLE_READ_TOKEN  a read-only admin token
  LATTICE_CONSOLE_DIR    where the script writes `authkey` and reads `nodes-started`
  LATTICE_CONSOLE_SCREENSHOTS  if set, a directory for one PNG per page
"""

import os
import re
import ssl
import sys
import tempfile
import time
import urllib.error
import urllib.request

from selenium import webdriver
from selenium.common.exceptions import (StaleElementReferenceException, TimeoutException,
                                        WebDriverException)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

URL = os.environ["LATTICE_CONSOLE_URL"]
TOKEN = os.environ["LATTICE_CONSOLE_TOKEN"]
READ_TOKEN = os.environ["LATTICE_CONSOLE_READ_TOKEN"]
WORK = os.environ["LATTICE_CONSOLE_DIR"]
SHOTS = os.environ.get("LATTICE_CONSOLE_SCREENSHOTS")

FAILING_POLICY = """{
  "tagOwners": {"tag:server": []},
  "acls": [
    {"action": "accept", "src": ["tag:server"], "dst": ["tag:server:22"]},
  ],
  "tests": [
    {"src": "tag:server", "accept": ["tag:server:80"]},
  ],
}
"""

GOOD_POLICY = """{
  "tagOwners": {"tag:server": []},
  "acls": [
    {"action": "accept", "src": ["tag:server"], "dst": ["tag:server:22,80"]},
  ],
  "tests": [
    {"src": "tag:server", "accept": ["tag:server:80"], "deny": ["tag:server:443"]},
  ],
}
"""


def step(text):
    print(f"step: {text}", flush=True)


def fail(text):
    print(f"FAILED: {text}", flush=True)
    sys.exit(1)


def check(ok, text):
    if not ok:
        fail(text)


def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for a in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1000",
        f"--user-data-dir={tempfile.mkdtemp(prefix='lattice-console-')}",
    ):
        opts.add_argument(a)
    # The admin listener's certificate is self-signed (the CLI pins it; a browser is told
    # to accept it, as an admin would once).
    opts.accept_insecure_certs = True
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)


def shot(d, name, show=None):
    if SHOTS:
        if show:
            d.execute_script("arguments[0].scrollIntoView({block: 'center'});",
                             d.find_element(By.ID, show))
        time.sleep(0.3)
        d.save_screenshot(os.path.join(SHOTS, f"{name}.png"))


def wait(d, cond, what, timeout=20):
    # The nodes page replaces its rows as the coordinator's stream updates them, so an
    # element found by one poll can be gone when its text is read: that poll counts as
    # "not yet" and the next one looks again. So does a poll that lands while a form's
    # submission loads the next page (Chrome aborts the lookup: "aborted by navigation").
    def settled(driver):
        try:
            return cond(driver)
        except WebDriverException as e:
            if "aborted by navigation" in (e.msg or ""):
                return False
            raise

    try:
        return WebDriverWait(d, timeout, poll_frequency=0.2,
                             ignored_exceptions=(StaleElementReferenceException,)).until(settled)
    except TimeoutException:
        fail(f"{what} (waited {timeout} s) on {d.current_url}\n{d.find_element(By.TAG_NAME, 'body').text[:3000]}")


def text_of(d, css):
    """The text of the first element matching `css`, or "" if none; looked up again
    when a live update replaced the element between finding and reading it."""
    for _ in range(10):
        els = d.find_elements(By.CSS_SELECTOR, css)
        try:
            return els[0].text if els else ""
        except StaleElementReferenceException:
            time.sleep(0.1)
    fail(f"{css} kept being replaced while its text was read")


def click(d, by, what):
    """Clicks the element, looked up again if a live update replaced it meanwhile."""
    for _ in range(10):
        try:
            d.find_element(by, what).click()
            return
        except StaleElementReferenceException:
            time.sleep(0.1)
    fail(f"{what} kept being replaced while it was clicked")


def accept_confirm(d):
    wait(d, EC.alert_is_present(), "a confirmation dialog")
    d.switch_to.alert.accept()


def go(d, url):
    """Opens `url`, again if Chromium saw the namespace's links settle meanwhile (IPv6
    addresses leaving their tentative state count as a network change for it)."""
    for _ in range(10):
        d.get(url)
        if "ERR_NETWORK_CHANGED" not in d.page_source:
            return
        time.sleep(1)
    fail(f"{url}: the network kept changing")


def sign_in(d, token):
    go(d, f"{URL}/console/login")
    box = wait(d, EC.presence_of_element_located((By.ID, "token")), "the sign-in form")
    box.clear()
    box.send_keys(token)
    d.find_element(By.CSS_SELECTOR, "#token-login button").click()


def raw(method, path, cookie=None, headers=None, body=None):
    """A request outside the browser: status and headers."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    req = urllib.request.Request(f"{URL}{path}", method=method, data=body)
    if cookie:
        req.add_header("Cookie", cookie)
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx), NoRedirect)
    try:
        with opener.open(req) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}


def set_editor(d, text):
    area = d.find_element(By.ID, "policy-editor")
    area.clear()
    # send_keys types line by line; the editor keeps the text as typed.
    d.execute_script("arguments[0].value = arguments[1];", area, text)


def main():
    d = browser()
    try:
        walk(d)
    finally:
        d.quit()
    print("console walk: every step passed", flush=True)


def walk(d):
    step("a wrong token is refused with a reason")
    go(d, f"{URL}/console/nodes")
    wait(d, EC.url_contains("/console/login"), "the console sends strangers to the sign-in page")
    shot(d, "01-sign-in")
    sign_in(d, "lt2-not-a-token")
    wait(d, EC.text_to_be_present_in_element((By.CSS_SELECTOR, ".notice.problem"), "not a valid admin token"), "the refusal")

    step("the admin token signs in")
    sign_in(d, TOKEN)
    wait(d, EC.url_contains("/console/nodes"), "the nodes page after signing in")
    cookie = d.get_cookie("__Host-lattice_console")
    check(cookie is not None, "a session cookie")
    check(cookie.get("httpOnly") and cookie.get("secure") and cookie.get("sameSite") == "Strict",
          f"the session cookie is HttpOnly, Secure, SameSite=Strict: {cookie}")
    session = f"__Host-lattice_console={cookie['value']}"

    step("the pages carry a strict Content-Security-Policy and changes need the CSRF token")
    status, headers = raw("GET", "/console/nodes", cookie=session)
    csp = headers.get("content-security-policy", "")
    check(status == 200 and "script-src 'self'" in csp and "unsafe" not in csp, f"CSP: {status} {csp}")
    check(headers.get("x-frame-options") == "DENY", "no framing")
    page = d.page_source
    check("<script>" not in page and " onclick=" not in page, "no inline script on the page")
    origin = {"Origin": URL, "Content-Type": "application/x-www-form-urlencoded"}
    status, _ = raw("POST", "/console/keys", cookie=session, headers=origin, body=b"expiry=1h")
    check(status == 403, f"a change without the CSRF token is refused: {status}")
    csrf = d.find_element(By.TAG_NAME, "body").get_attribute("hx-headers").split('"')[3]
    cross = dict(origin, **{"Origin": "https://evil.example", "X-CSRF-Token": csrf})
    status, _ = raw("POST", "/console/keys", cookie=session, headers=cross, body=b"expiry=1h")
    check(status == 403, f"a change from another origin is refused: {status}")

    step("create a reusable auth key for tag:server")
    go(d, f"{URL}/console/keys")
    wait(d, EC.presence_of_element_located((By.ID, "new-key")), "the new-key form")
    d.find_element(By.NAME, "reusable").click()
    d.find_element(By.NAME, "tags").send_keys("tag:server")
    expiry = d.find_element(By.NAME, "expiry")
    expiry.clear()
    expiry.send_keys("2h")
    d.find_element(By.ID, "create-key").click()
    secret = wait(d, EC.presence_of_element_located((By.ID, "new-key-secret")), "the created key").text
    check(secret.startswith("lk"), f"an auth key: {secret[:6]}...")
    wait(d, lambda d: "reusable" in text_of(d, "#keys tbody tr"), "the key list updates by itself")
    shot(d, "03-auth-keys")
    with open(os.path.join(WORK, "authkey.tmp"), "w") as f:
        f.write(secret)
    os.rename(os.path.join(WORK, "authkey.tmp"), os.path.join(WORK, "authkey"))

    step("the nodes come online on the nodes page without a reload")
    go(d, f"{URL}/console/nodes")
    wait(d, EC.presence_of_element_located((By.ID, "nodes")), "the nodes table")
    d.execute_script("window.latticeNoReload = true;")
    for name in ("web", "db"):
        wait(d, lambda d, n=name: "online" in text_of(d, f'tr[data-node="{n}"] td.state'),
             f"{name} online in the live table", timeout=90)
    check(d.execute_script("return window.latticeNoReload === true;"), "the page was not reloaded")
    row = text_of(d, 'tr[data-node="web"]')
    check("tag:server" in row and "100." in row, f"web's row: {row}")
    wait(d, lambda d: "direct" in text_of(d, 'tr[data-node="web"] td.paths'),
         "web reports a direct path to db", timeout=60)
    shot(d, "02-nodes")

    step("a node's page shows its paths, and an attribute is set")
    click(d, By.LINK_TEXT, "web")
    wait(d, lambda d: "direct" in text_of(d, 'tr[data-peer="db"]'), "web's path to db: direct", timeout=30)
    d.find_element(By.CSS_SELECTOR, 'form.inline input[name="name"]').send_keys("custom:team")
    d.find_element(By.CSS_SELECTOR, 'form.inline input[name="value"]').send_keys("payments")
    d.find_element(By.ID, "set-attr").click()
    wait(d, EC.text_to_be_present_in_element((By.ID, "result"), "custom:team set"), "the attribute set")
    wait(d, lambda d: "payments" in text_of(d, "#attrs"), "the attribute listed")
    shot(d, "04-node")

    step("a policy whose test fails is refused, and nothing changes")
    go(d, f"{URL}/console/policy")
    before = wait(d, EC.presence_of_element_located((By.ID, "policy-text")), "the policy in force").text
    versions_before = len(d.find_elements(By.CSS_SELECTOR, "#versions tbody tr"))
    set_editor(d, FAILING_POLICY)
    d.find_element(By.ID, "save").click()
    accept_confirm(d)
    wait(d, EC.text_to_be_present_in_element((By.ID, "policy-result"), "policy rejected"), "the refusal")
    result = text_of(d, "#policy-result")
    check("tag:server:80" in result and re.search(r"policy\.hujson:\d+:\d+: test failed", result),
          f"the refusal names the failing test at file:line:col: {result}")
    shot(d, "05-policy-refused", show="policy-result")
    go(d, f"{URL}/console/policy")
    after = wait(d, EC.presence_of_element_located((By.ID, "policy-text")), "the policy in force").text
    check(after == before, "the policy in force is unchanged")
    check(len(d.find_elements(By.CSS_SELECTOR, "#versions tbody tr")) == versions_before, "no new version")

    step("a good policy: check shows who loses access, then save it")
    set_editor(d, GOOD_POLICY)
    d.find_element(By.ID, "check").click()
    wait(d, EC.presence_of_element_located((By.ID, "policy-outcome")), "the check's outcome")
    lost = text_of(d, "#lost")
    check("web" in lost and "db" in lost, f"the diff lists lost access between web and db: {lost}")
    shot(d, "06-policy-diff", show="policy-result")
    d.find_element(By.ID, "save").click()
    accept_confirm(d)
    wait(d, EC.text_to_be_present_in_element((By.ID, "policy-result"), "is in force"), "saved")
    go(d, f"{URL}/console/policy")
    wait(d, lambda d: "tag:server:22,80" in text_of(d, "#policy-text"), "the new policy in force")
    check(len(d.find_elements(By.CSS_SELECTOR, "#versions tbody tr")) == versions_before + 1, "one more version")

    step("the audit log shows the changes and verifies")
    go(d, f"{URL}/console/audit?q=policy")
    wait(d, lambda d: "policy" in text_of(d, "#audit tbody"), "policy entries")
    d.find_element(By.ID, "verify").click()
    wait(d, EC.text_to_be_present_in_element((By.ID, "verify-result"), "verifies"), "the chain verifies")
    shot(d, "07-audit")

    step("relays and settings")
    go(d, f"{URL}/console/relays")
    wait(d, lambda d: "embedded" in d.find_element(By.TAG_NAME, "body").text.lower(), "the embedded relay")
    shot(d, "08-relays")
    go(d, f"{URL}/console/settings")
    wait(d, EC.presence_of_element_located((By.ID, "save-settings")), "the settings form")
    shot(d, "09-settings")

    step("remove a node")
    go(d, f"{URL}/console/nodes/db")
    wait(d, EC.presence_of_element_located((By.ID, "remove")), "the remove button").click()
    accept_confirm(d)
    wait(d, EC.url_contains("/console/nodes"), "back on the nodes page")
    wait(d, lambda d: not d.find_elements(By.CSS_SELECTOR, 'tr[data-node="db"]')
         and d.find_elements(By.CSS_SELECTOR, 'tr[data-node="web"]'), "db gone, web still listed")

    step("sign out, then a read-only token may look but not change")
    d.find_element(By.ID, "logout").click()
    wait(d, EC.url_contains("/console/login"), "signed out")
    status, _ = raw("GET", "/console/nodes", cookie=session)
    check(status == 303, f"the old session is gone: {status}")
    sign_in(d, READ_TOKEN)
    wait(d, EC.url_contains("/console/nodes"), "signed in read-only")
    check("(read only)" in text_of(d, "header .who"), "the page says read only")
    go(d, f"{URL}/console/keys")
    check(not d.find_elements(By.ID, "new-key"), "no new-key form for a read-only token")
    ro = d.get_cookie("__Host-lattice_console")["value"]
    csrf = d.find_element(By.TAG_NAME, "body").get_attribute("hx-headers").split('"')[3]
    status, _ = raw("POST", "/console/keys", cookie=f"__Host-lattice_console={ro}",
                    headers=dict(origin, **{"X-CSRF-Token": csrf}), body=b"expiry=1h")
    check(status == 403, f"a read-only token cannot create a key: {status}")


if __name__ == "__main__":
    main()
