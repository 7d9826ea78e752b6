#!/usr/bin/env python3
"""The reference decoder for the video-corpus tests: PyAV's frames of a file, upright.

Frame k is the k-th frame PyAV's decoder presents (`container.decode(stream)`), converted
with `to_ndarray(format="rgb24")` and turned upright by the frame's display rotation (as
players autorotate). Writes the frames at INDICES as packed RGB to OUT and prints one
JSON line: the frame count, each frame's time in seconds from the first, the size and the
rotation applied.

    pyav_frames.py VIDEO INDICES(comma-separated, or "all") OUT
"""

import json
import sys

import av
import numpy as np


def main():
    path, which, out = sys.argv[1], sys.argv[2], sys.argv[3]
    with av.open(path) as c:
        stream = c.streams.video[0]
        frames = list(c.decode(stream))
    indices = range(len(frames)) if which == "all" else [int(i) for i in which.split(",")]
    # A stream without timestamps has no times.
    times = [x.time - frames[0].time for x in frames] if frames[0].time is not None else []
    rotation = frames[0].rotation  # counter-clockwise degrees, as av_display_rotation_get
    with open(out, "wb") as f:
        for i in indices:
            rgb = frames[i].to_ndarray(format="rgb24")
            # np.rot90 turns counter-clockwise; the display turns by -rotation clockwise.
            f.write(np.ascontiguousarray(np.rot90(rgb, k=(rotation // 90) % 4)).tobytes())
    h, w = np.rot90(frames[0].to_ndarray(format="rgb24"), k=(rotation // 90) % 4).shape[:2]
    print(json.dumps({"frames": len(frames), "times": [float(t) for t in times], "width": w, "height": h,
                      "rotation": (-rotation) % 360}))


if __name__ == "__main__":
    main()
