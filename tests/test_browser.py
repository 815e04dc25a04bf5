"""The what-if sliders in a real browser: JupyterLab + headless Chromium driven by Playwright.

Starts JupyterLab on a free localhost port with a token, opens a copy of ``notebooks/09_what_if.ipynb`` with
``WIDGETS = True`` (quick mode, figures to ``build/browser/figures``), runs all cells, moves the m1 and gamma
sliders with the keyboard and checks that each widget's figure (the ``<img>`` data) changes, and that the gamma
cell shows one figure only. Screenshots and the before/after figures go to ``build/browser/``.

Slow (model load + the notebook: a few minutes on 2 CPU cores). Needs Chromium and Playwright:

    apt-get install chromium            # Debian/Ubuntu; or set CHROMIUM=/path/to/chromium
    pip install -e ".[browser]"         # playwright (never `playwright install`: the system Chromium is used)
    make test-browser                   # = pytest -m slow tests/test_browser.py
"""
import base64
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "build", "browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
RUN_TIMEOUT_S = 1800  # model load + notebook 09 in quick mode (4-10 min on 2 busy CPU cores), with margin
LOAD_TIMEOUT_MS = 600_000  # JupyterLab opening the notebook and starting its kernel on a busy machine
REDRAW_TIMEOUT_S = 60
SETTLE_S = 10
SHOT_TIMEOUT_MS = 120_000

pytestmark = pytest.mark.slow


def _chromium():
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.skip("Chromium not found: `apt-get install chromium` (or set CHROMIUM=/path/to/chromium)")
    return path


def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright not installed: `pip install -e \".[browser]\"` (uses the system Chromium)")
    return sync_playwright


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_settings(settings_dir):
    """Lab settings for a deterministic page: every cell rendered, no news/update prompts."""
    files = {"@jupyterlab/notebook-extension/tracker.jupyterlab-settings": '{"windowingMode": "none"}',
             "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
                 '{"fetchNews": "false", "checkForUpdates": false}'}
    for name, text in files.items():
        path = os.path.join(settings_dir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)


@pytest.fixture
def browser():
    """(Chromium path, playwright's sync_playwright), or a skip naming what is missing; checked before the lab starts."""
    return _chromium(), _playwright()


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server rooted at the project; yields (base url, token). Its process group is ended after."""
    pytest.importorskip("jupyterlab", reason="jupyterlab not installed: `pip install -e \".[notebooks]\"`")
    port, token = _free_port(), base64.b16encode(os.urandom(12)).decode().lower()
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp_path / "config"), JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"), OMP_NUM_THREADS="1")
    _write_settings(env["JUPYTERLAB_SETTINGS_DIR"])
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={ROOT}", "--ServerApp.port_retries=0"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    log = open(tmp_path / "lab.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() - t0 > 120:
                    log.flush()
                    pytest.fail("JupyterLab did not start:\n" + (tmp_path / "lab.log").read_text()[-3000:])
                time.sleep(0.5)
        yield base, token
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        shutil.copy(tmp_path / "lab.log", os.path.join(OUT, "lab.log"))


def _notebook_copy(data_dir):
    """build/browser/09_what_if.ipynb: the stored notebook with WIDGETS = True and figures under build/browser."""
    import papermill as pm
    os.makedirs(OUT, exist_ok=True)
    dst = os.path.join(OUT, "09_what_if.ipynb")
    pm.execute_notebook(os.path.join(ROOT, "notebooks", "09_what_if.ipynb"), dst, prepare_only=True,
                        parameters={"WIDGETS": True, "QUICK": True, "DATA_DIR": data_dir,
                                    "FIG_DIR": os.path.join(OUT, "figures")}, progress_bar=False)
    return os.path.relpath(dst, ROOT)


def _shot(target, name, **kw):
    """Screenshot of a page or element to build/browser/NAME; on a busy machine a slow screenshot only warns."""
    try:
        target.screenshot(path=os.path.join(OUT, name), timeout=SHOT_TIMEOUT_MS, **kw)
    except Exception as e:  # playwright's TimeoutError; the checks do not depend on the pictures
        print(f"screenshot {name} not saved: {type(e).__name__}: {str(e).splitlines()[0]}")


def _save_img(src, name):
    assert src.startswith("data:image/png;base64,"), src[:80]
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(base64.b64decode(src.split(",", 1)[1]))


def _move_slider(page, label, presses, shot):
    """Press ArrowRight ``presses`` times on the slider named ``label``; returns (readout before, after, figure src
    before, after) once the widget's figure changed or REDRAW_TIMEOUT_S passed."""
    slider = page.locator(".widget-hslider", has=page.locator(".widget-label", has_text=re.compile(f"^{label}$")))
    box = page.locator(".widget-vbox", has=slider).last
    img = box.locator(".widget-output img")
    img.wait_for(timeout=30_000)
    before_src, before_readout = img.get_attribute("src"), slider.locator(".widget-readout").inner_text()
    box.scroll_into_view_if_needed()
    _shot(box, f"{shot}_before.png")
    handle = slider.locator(".noUi-handle")
    handle.focus()
    for _ in range(presses):
        handle.press("ArrowRight")
    after_src, t0 = before_src, time.time()
    while after_src == before_src and time.time() - t0 < REDRAW_TIMEOUT_S:
        page.wait_for_timeout(250)
        after_src = img.get_attribute("src")
    # the kernel redraws once per key press (an alpha redraw takes seconds on a busy machine): let the last one
    # arrive (no change for SETTLE_S) before the pictures are taken
    settled = time.time()
    while after_src != before_src and time.time() - settled < SETTLE_S and time.time() - t0 < REDRAW_TIMEOUT_S:
        page.wait_for_timeout(250)
        src = img.get_attribute("src")
        if src != after_src:
            after_src, settled = src, time.time()
    _shot(box, f"{shot}_after.png")
    _save_img(before_src, f"{shot}_figure_before.png")
    _save_img(after_src, f"{shot}_figure_after.png")
    return before_readout, slider.locator(".widget-readout").inner_text(), before_src, after_src


def test_sliders_redraw_their_figures_in_jupyterlab(browser, lab, data_dir, tmp_path):
    chromium, sync_playwright = browser
    base, token = lab
    nb_path = _notebook_copy(data_dir)
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=chromium, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000})
        page = ctx.new_page()
        page.set_default_timeout(120_000)  # a busy 2-core machine renders slowly
        try:
            page.goto(f"{base}/lab/tree/{nb_path}?token={token}", timeout=LOAD_TIMEOUT_MS)
            page.locator(".jp-NotebookPanel .jp-Cell").first.wait_for(timeout=LOAD_TIMEOUT_MS)
            page.locator("#jp-main-statusbar").get_by_text(re.compile(r"\| Idle")).wait_for(timeout=LOAD_TIMEOUT_MS)
            page.locator("li.lm-MenuBar-item", has_text="Run").first.click()
            page.locator("li.lm-Menu-item[data-command='runmenu:run-all']").click()
            done = page.get_by_text(re.compile(r"notebook time \d+ s"))
            error = page.locator(".jp-OutputArea-output", has_text="Traceback")
            t0 = time.time()
            while not done.count():
                if page.locator(".jp-Dialog").count():  # e.g. a kernel choice: take the default, as a user would
                    page.locator(".jp-Dialog .jp-mod-accept").click()
                if error.count():
                    _shot(page, "error.png")
                    pytest.fail("a cell of the notebook failed in JupyterLab:\n" + error.first.inner_text()[-3000:])
                assert time.time() - t0 < RUN_TIMEOUT_S, f"notebook did not finish in {RUN_TIMEOUT_S} s"
                page.wait_for_timeout(1000)
            print(f"notebook ran in JupyterLab in {time.time() - t0:.0f} s")
            _shot(page, "notebook_done.png")

            problems = []  # every check runs, so one run names every failure
            # the gamma cell shows its own static figure only (no stray copy of the alpha widget's figure)
            gamma_cell = page.locator(".jp-CodeCell", has_text="fig = gamma.figure()")
            n_img = gamma_cell.locator(".jp-OutputArea-output img").count()
            if n_img != 1:
                problems.append(f"the gamma cell shows {n_img} figures, expected 1 (a stray figure is displayed)")
            for label, presses, shot in (("m1", 5, "alpha"), ("gamma", 3, "gamma")):
                r0, r1, src0, src1 = _move_slider(page, label, presses, shot)
                print(f"{label}: readout {r0} -> {r1}; figure changed: {src0 != src1}")
                if r1 == r0:
                    problems.append(f"the {label} slider did not move (readout stayed {r0})")
                elif src1 == src0:
                    problems.append(f"the {label} slider moved ({r0} -> {r1}) but its figure did not change within "
                                    f"{REDRAW_TIMEOUT_S} s (screenshots in build/browser/{shot}_*.png)")
            assert not problems, "; ".join(problems)
        except Exception:
            _shot(page, "failure.png")
            raise
        finally:
            ctx.close()
