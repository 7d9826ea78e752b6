#!/usr/bin/env bash
# The frame-exactness corpus (issue 16): short clips made with the ffmpeg CLI in the ways
# real files break naive frame numbering, and PyAV (the reference decoder,
# tests/scripts/pyav_frames.py) in its own venv. Cached outside the clone; prints the
# folder. The venv's python is <folder>/venv/bin/python.
#
# testsrc2 draws a moving pattern and a frame counter, so every frame differs from its
# neighbours and an off-by-one shows.
set -euo pipefail
VERSION=5 # bump when the files change
DIR="${VIDLLM_CACHE:-$HOME/.cache/vidllm}/video-corpus"
if [ -f "$DIR/done-$VERSION" ]; then echo "$DIR"; exit 0; fi
rm -rf "$DIR"
mkdir -p "$DIR"
cd "$DIR"
python3 -m venv venv >&2
venv/bin/pip install --quiet av==18.1.0 numpy==2.3.5 >&2
f() { ffmpeg -v error -y "$@" >&2; }
SRC=(-f lavfi -i testsrc2=size=176x144:rate=25:duration=3)
# B-frames (3) in MP4: an edit list hides the decoder's delay (first dts negative).
f "${SRC[@]}" -c:v libx264 -bf 3 -g 12 -pix_fmt yuv420p h264_bframes.mp4
# The same stream in Matroska: packets carry pts only.
f -i h264_bframes.mp4 -c copy h264_bframes.mkv
# Without an edit list the first displayed frame is at 0.08 s: the start is not 0.
f "${SRC[@]}" -c:v libx264 -bf 3 -g 12 -pix_fmt yuv420p -use_editlist 0 start_offset.mp4
# Cut 0.5 s in by stream copy: the edit list starts between keyframes, and the packets
# before it are decoded but never shown.
f -ss 0.5 -i h264_bframes.mp4 -c copy editlist.mp4
# Open GOPs: leading B-frames after each keyframe refer to the GOP before.
f "${SRC[@]}" -c:v libx264 -bf 3 -x264-params open-gop=1:keyint=24:min-keyint=24:scenecut=0 -pix_fmt yuv420p open_gop.mkv
# MPEG-4 Part 2 with B-frames in AVI (Xvid/DivX style): decode-order timestamps.
f "${SRC[@]}" -c:v mpeg4 -bf 2 -g 12 -q:v 4 mpeg4_bframes.avi
# Variable frame rate: 1 s at 10 fps then 1 s at 30 fps.
f -f lavfi -i testsrc2=size=176x144:rate=10:duration=1 -f lavfi -i testsrc2=size=176x144:rate=30:duration=1 \
  -filter_complex "[0:v][1:v]concat=n=2:v=1[v]" -map "[v]" -fps_mode vfr -c:v libx264 -bf 2 -pix_fmt yuv420p vfr.mkv
# A phone's rotate tag (a display matrix): players show it turned.
f -i h264_bframes.mp4 -c copy -metadata:s:v:0 rotate=90 rotated.mp4
# An odd size (VP9 keeps it; testsrc2 draws even sizes only, so it is scaled, square
# pixels kept: a browser shows a non-square sample aspect stretched).
f -f lavfi -i testsrc2=size=640x360:rate=25:duration=1 -vf scale=641:359,setsar=1 -pix_fmt yuv420p -c:v libvpx-vp9 -b:v 600k odd_size.webm
# 10-bit 4:2:0: H.264 High 10 with B-frames, and VP9 profile 2.
f "${SRC[@]}" -c:v libx264 -bf 3 -pix_fmt yuv420p10le tenbit.mkv
f "${SRC[@]}" -c:v libvpx-vp9 -b:v 400k -pix_fmt yuv420p10le tenbit_vp9.webm
# The video is the second stream, after the audio.
f -f lavfi -i sine=frequency=440:duration=3 "${SRC[@]}" -map 0:a -map 1:v -c:v libx264 -c:a aac -pix_fmt yuv420p audio_first.mkv
# Bad input: an H.264 elementary stream (no timestamps at all), presentation timestamps
# that go backwards (one frame's pts moved before its neighbours'), and a file cut off
# in its last GOP.
f -i h264_bframes.mp4 -c copy -bsf:v h264_mp4toannexb no_timestamps.h264
f -i h264_bframes.mp4 -c copy -bsf:v "setts=pts=if(eq(N\,30)\,PTS-2048\,PTS)" backwards.mkv
head -c 60000 h264_bframes.mkv > truncated.mkv
touch "done-$VERSION"
echo "$DIR"
