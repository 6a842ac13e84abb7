"""``anyseg serve``: the HTTP API and the browser labelling app."""
from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from .common import add_model_arguments

DESCRIPTION = """\
Serve the labelling app at http://HOST:PORT/ and the HTTP API under /api/v1 (OpenAPI docs at
/api/v1/docs). In the page: open or drop an image (or pick one from --images), left-click on the
object, right-click (or Alt-click) on the background, drag a box; cycle the three candidate masks,
undo / redo, accept objects with a label, segment everything, and export PNG masks, COCO JSON and
polygons. Clicks are decoded in the browser (onnxruntime-web, after 'make web') once the decoder
graph has been exported, else on the server. --model takes SAM 1 (ViT, MobileSAM) and SAM 2 / 2.1
checkpoints; SAM 2 models always decode on the server (there is no browser decoder graph for them yet).

Images are encoded once and cached by content hash (LRU bounded by --cache-mb). With --annotations,
accepted objects are written to that COCO JSON file (atomically) after every change, and shown
again after a restart; each records how it was made (manual, assisted clicks, accepted auto-label
proposal), by which model, with how many clicks and seconds. 'anyseg train --data coco:FILE' trains
on that file (images from --images). With --models DIR the page (and POST /api/v1/models/switch) can
switch to any checkpoint in DIR, e.g. the runs folder of 'anyseg train', without a restart.

Security: the server binds to 127.0.0.1 unless told otherwise; only files inside --images are ever
read; request bodies, uploads and image sizes are limited. Set --token (or ANYSEG_TOKEN) to require
'Authorization: Bearer TOKEN' on every API call; open the page as http://HOST:PORT/#token=TOKEN."""

EXAMPLES = """\
examples:
  anyseg serve --model vit_b --images photos/ --annotations photos/labels.json
  anyseg serve --model sam_vit_b_01ec64.pth --port 8080 --token s3cret
  anyseg serve --model sam2.1_hiera_tiny.pt --images photos/
  # the data-engine loop: label, retrain the decoder on the labels, switch to the new model
  anyseg serve --model vit_b --images photos/ --annotations labels.json --models runs/
  anyseg train --model vit_b --mode decoder --data coco:labels.json -o runs/round1
  curl -F file=@photo.jpg http://127.0.0.1:8000/api/v1/images"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve the browser labelling app and the HTTP API", description=DESCRIPTION,
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument("--images", metavar="DIR", default=None,
                        help="folder of images the page can browse (nothing outside it is served)")
    parser.add_argument("--annotations", metavar="FILE", default=None,
                        help="COCO JSON file for accepted objects (created if missing, rewritten atomically)")
    parser.add_argument("--models", metavar="DIR", default=None,
                        help="folder of checkpoints (.pth, .pt, .safetensors; e.g. anyseg train's runs) the page "
                             "can switch to without a restart")
    parser.add_argument("--concept-model", metavar="MODEL", default=None,
                        help="a SAM 3 model (sam3 or a sam3.pt file) for concept prompts next to --model: POST "
                             "/api/v1/images/{id}/concept finds every instance of a phrase (see docs/sam3.md)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    parser.add_argument("--token", default=os.environ.get("ANYSEG_TOKEN"),
                        help="require this bearer token on the API (default: $ANYSEG_TOKEN, unset = no auth)")
    parser.add_argument("--cache-mb", type=int, default=1024, metavar="MB",
                        help="memory for cached embeddings and decoded images (default: 1024)")
    parser.add_argument("--max-upload-mb", type=int, default=32, metavar="MB",
                        help="largest request body / image file (default: 32)")
    parser.add_argument("--max-pixels", type=int, default=40_000_000,
                        help="largest image, width x height (default: 40000000)")
    parser.add_argument("--no-browser-decoder", action="store_true",
                        help="do not export the decoder for the page: decode every click on the server")
    parser.add_argument("--decoder-dir", default=None, metavar="DIR",
                        help="where the exported decoder graph is cached (default: $ANYSEG_HOME/onnx)")
    parser.add_argument("--page-graph", default="approximate", choices=("approximate", "exact"),
                        help="the page's decoder graph: approximate (default; int8 upscaling, masks within "
                             "IoU 0.98 of the float32 decode) or exact (float32)")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                        help="server log verbosity (default: info)")
    parser.set_defaults(func=run)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        print("anyseg serve: error: the server needs FastAPI, uvicorn and python-multipart; "
              "install them with: pip install 'anyseg[server]'", file=sys.stderr)
        return 2
    from pathlib import Path

    from ..server import ServerSettings, create_app
    from .common import load_model_from_args

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    settings = ServerSettings(
        images_dir=Path(args.images) if args.images else None,
        annotations_path=Path(args.annotations) if args.annotations else None,
        token=args.token or None,
        max_request_bytes=args.max_upload_mb * 1024 * 1024,
        max_pixels=args.max_pixels,
        cache_bytes=args.cache_mb * 1024 * 1024,
        browser_decoder=not args.no_browser_decoder,
        decoder_dir=Path(args.decoder_dir) if args.decoder_dir else None,
        page_graph=args.page_graph,
        model_name=str(args.model),
        models_dir=Path(args.models) if args.models else None,
    )
    if not _is_loopback(args.host) and settings.token is None:
        print(f"anyseg serve: warning: listening on {args.host} without --token: anyone who can reach this "
              "address can use the API", file=sys.stderr)
    # A server's memory should follow its cache bound: glibc keeps returning freed decoder buffers.
    model = load_model_from_args(args, keep_freed_memory=False)
    concept = None
    if args.concept_model:
        from ..checkpoint import load_model
        from ..protocol import model_family

        concept = load_model(args.concept_model, device=model.device)
        if model_family(concept) != "sam3":
            raise ValueError(f"--concept-model must be a SAM 3 model (sam3 or a sam3.pt file); {args.concept_model} "
                             f"is a {model_family(concept)} model")
    app = create_app(model, settings, concept_model=concept, concept_model_name=str(args.concept_model or "sam3"))
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"anyseg serve: model {args.model} on {model.device}; open http://{shown}:{args.port}/"
          + ("#token=..." if settings.token else ""), file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
