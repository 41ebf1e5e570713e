"""Screenshot visiontune-serve's try-it page after an upload, in a real browser (Debian's chromium + Playwright).

    python scripts/page_screenshot.py CKPT_OR_FOLDER IMAGE OUT.png [--docs DOCS.png]

Serves the model on a free local port, opens http://127.0.0.1:<port>/, uploads IMAGE through the page's
file input, waits for the bars and writes OUT.png (and, with --docs, a screenshot of /docs). Prints what
the page shows. docs/after-training.md's screenshots come from this script.
"""

from __future__ import annotations

import argparse
import shutil

from playwright.sync_api import sync_playwright

from visiontune.deploy.session import InferenceSession
from visiontune.serve import ServerThread, bind_socket, create_app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a checkpoint, an adapter file or a Hub folder")
    parser.add_argument("image")
    parser.add_argument("out")
    parser.add_argument("--docs", help="also screenshot /docs, with /predict opened, to this file")
    args = parser.parse_args()
    app = create_app(InferenceSession.from_checkpoint(args.model, "cpu"))
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    with ServerThread(app, bind_socket("127.0.0.1", 0)) as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 720})
        page.goto(server.url + "/")
        page.wait_for_selector("#metrics td, #metrics p")
        page.set_input_files("#file", args.image)
        page.wait_for_selector("#result .bar")
        page.screenshot(path=args.out, full_page=True)
        print("page shows:", " ".join(page.inner_text("#result").split()))
        if args.docs:
            page.goto(server.url + "/docs")
            page.click(".opblock-summary-path[data-path='/predict']")
            page.click("button.try-out__btn")
            page.wait_for_selector(".opblock-body input[type=file]")
            page.screenshot(path=args.docs, full_page=False)
        browser.close()
    print("wrote", args.out, *([args.docs] if args.docs else []))


if __name__ == "__main__":
    main()
