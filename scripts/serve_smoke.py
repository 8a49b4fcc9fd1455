"""One request to a running `prs serve` (the GPU check's serve step; standard library only).

Usage: python3 serve_smoke.py URL IMAGE. Prints the status, the answer and the server timings;
exits non-zero unless the answer is 200 with a mask.
"""
import json
import sys
import time
import urllib.request

url, image = sys.argv[1], sys.argv[2]
boundary = "prs-serve-smoke"
with open(image, "rb") as f:
    data = f.read()
body = (
    f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"scan.png\"\r\n"
    f"Content-Type: image/png\r\n\r\n".encode()
    + data
    + f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"question\"\r\n\r\n"
    f"Where is the lesion located in this image?\r\n--{boundary}--\r\n".encode()
)
for attempt in range(3):
    req = urllib.request.Request(
        url + "/v1/predict", data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    t0 = time.time()
    with urllib.request.urlopen(req, timeout=300) as r:
        reply = json.load(r)
        status = r.status
    print(f"request {attempt}: HTTP {status} in {time.time() - t0:.3f} s, answer {reply['answer']!r}, "
          f"server {reply['server']}, device {reply['model']['device']}")
    if status != 200 or not reply.get("mask_png_base64"):
        sys.exit(1)
