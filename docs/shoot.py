"""Screenshots of the web UIs for the README, taken as a person sees them: headless Chromium, driven over CDP.

    python docs/shoot.py URL OUT.png [--step ACTION ...] [--cookie NAME=VALUE] [--size 1400x900]

ACTION is one of
    wait:SECONDS          let the page work (fetches, rendering)
    click:CSS             click the first element matching a CSS selector
    text:WORDS            click the innermost visible element whose text is WORDS
    type:CSS|TEXT         focus an input and type TEXT into it
    key:Escape            press a key
    goto:URL              open another page in the same browser (what the page stored, e.g. a view, stays)
Every step fails loudly when its element is missing, so a screenshot is never of the wrong page. PNGs over
300 KB are reduced to 256 colours. Needs Debian's `chromium` and aiohttp (installed with Ray's dashboard).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--remote-debugging-port=0",
]
MAX_BYTES = 300_000

# Each returns the centre of the element to click (after scrolling it into view), or null.
BY_CSS = """(selector) => { const e = document.querySelector(selector); if (!e) return null;
  e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }"""
BY_TEXT = """(words) => {
  const hits = [...document.querySelectorAll('body *')].filter(e => e.offsetParent !== null &&
      e.textContent.trim() === words && ![...e.children].some(c => c.textContent.trim() === words));
  if (!hits.length) return null;
  hits[0].scrollIntoView({block: 'center'}); const r = hits[0].getBoundingClientRect();
  return [r.x + r.width / 2, r.y + r.height / 2]; }"""


class Page:
    def __init__(self, ws):
        self.ws, self.ids = ws, itertools.count(1)

    async def send(self, method: str, **params):
        msg_id = next(self.ids)
        await self.ws.send_json({"id": msg_id, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json(timeout=120)
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def click(self, finder: str, arg: str) -> bool:
        """A real mouse click (press and release) at the element's centre, as menus that open on press need."""
        point = await self.js(f"({finder})({json.dumps(arg)})")
        if point is None:
            return False
        x, y = point
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)
        return True

    async def js(self, expression: str):
        result = await self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")


async def shoot(url: str, out: Path, steps: list[str], cookies: list[str], size: tuple[int, int]) -> None:
    profile = Path(tempfile.mkdtemp(prefix="shoot-"))
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("docs/shoot.py: error: no chromium on PATH (Debian: apt-get install chromium)")
    proc = subprocess.Popen(
        [browser, *FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + 60
        while not port_file.exists() or not port_file.read_text().strip():
            if time.time() > deadline:
                raise RuntimeError("chromium did not open its debugging port")
            await asyncio.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as resp:
                target = next(t for t in await resp.json() if t["type"] == "page")
            async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                page = Page(ws)
                await page.send("Page.enable")
                await page.send(
                    "Emulation.setDeviceMetricsOverride",
                    width=size[0],
                    height=size[1],
                    deviceScaleFactor=1,
                    mobile=False,
                )
                for cookie in cookies:
                    name, value = cookie.split("=", 1)
                    await page.send("Network.setCookie", name=name, value=value, url=url)
                await page.send("Page.navigate", url=url)
                await asyncio.sleep(3)
                for step in steps:
                    kind, _, arg = step.partition(":")
                    if kind == "wait":
                        await asyncio.sleep(float(arg))
                    elif kind == "click":
                        if not await page.click(BY_CSS, arg):
                            raise RuntimeError(f"{step}: no such element on {url}")
                    elif kind == "text":
                        if not await page.click(BY_TEXT, arg):
                            raise RuntimeError(f"{step}: no visible element with that text on {url}")
                    elif kind == "type":
                        selector, _, text = arg.partition("|")
                        if not await page.js(
                            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
                            "if (!e) return false; e.focus(); return true; })()"
                        ):
                            raise RuntimeError(f"{step}: no such element on {url}")
                        await page.send("Input.insertText", text=text)
                    elif kind == "goto":
                        await page.send("Page.navigate", url=arg)
                        await asyncio.sleep(3)
                    elif kind == "key":
                        for event in ("keyDown", "keyUp"):
                            await page.send("Input.dispatchKeyEvent", type=event, key=arg, code=arg)
                    else:
                        raise ValueError(f"unknown step {step!r}")
                shot = await page.send("Page.captureScreenshot", format="png")
        png = base64.b64decode(shot["data"])
        if len(png) > MAX_BYTES:
            from PIL import Image

            buffer = io.BytesIO()
            Image.open(io.BytesIO(png)).convert("RGB").quantize(256).save(buffer, format="PNG", optimize=True)
            png = buffer.getvalue()
        out.write_bytes(png)
        print(f"{out}: {len(png) / 1000:.0f} KB")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url")
    p.add_argument("out", type=Path)
    p.add_argument("--step", action="append", default=[])
    p.add_argument("--cookie", action="append", default=[])
    p.add_argument("--size", default="1400x900")
    args = p.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    asyncio.run(shoot(args.url, args.out, args.step, args.cookie, (width, height)))


if __name__ == "__main__":
    main()
