"""Instruction templates for the segmentation-family tasks (written for this project; not the reference lists).

One template is drawn per sample (``pick``), seeded by the sample key, so an epoch's instructions are
reproducible. The segmentation templates all ask for *instance-level colour coding* (every instance its own
colour), which is what the target shows; none says "semantic" or "class".

``config.data.seg_instructions`` may name a file that replaces the segmentation list, for training and
inference alike (``instruction_lists``): e.g. the 279 templates the released SGT checkpoint was trained on
(US spelling; song2yu/SGT ``BAGEL/data/consts.py`` ``get_segment_prompt_list``), written out one per line.
"""

from __future__ import annotations

import json
import os

import numpy as np

from sgt_jax.data.render import key_seed

SEGMENTATION = (
    "Paint every instance in its own colour.",
    "Give each object a different colour.",
    "Colour each instance differently.",
    "Segment the image, one colour per instance.",
    "Show every object as a flat region of its own colour.",
    "Produce an instance colour map of this picture.",
    "Draw the instance segmentation with a distinct colour for each object.",
    "Fill each separate object with a unique colour.",
    "Split the scene into instances and colour them all differently.",
    "Render each instance as a solid patch of a different colour.",
    "Mark every object with its own colour.",
    "Make an instance map where no two objects share a colour.",
    "Turn this photo into coloured instance masks.",
    "Replace each object with a flat colour of its own.",
    "Colour-code the instances in the image.",
    "Assign a distinct colour to every instance.",
    "Generate the instance segmentation, each mask in a new colour.",
    "Separate all objects and give each one a colour.",
    "Create a mask image with one colour per object.",
    "Highlight each instance using a different colour.",
    "Segment all instances with different colours.",
    "Show the instance masks, each in a distinct colour.",
    "Outline and fill every object with its own colour.",
    "Give every region that is a separate object a unique colour.",
    "Produce a colour-coded map of all instances.",
    "Convert the image into per-instance colour regions.",
    "Colour each mask in the image differently.",
    "Draw each object as a uniquely coloured silhouette.",
    "Label every instance with a different colour.",
    "Make each distinct object a different colour.",
    "Segment this image: one flat colour for each instance.",
    "Paint the objects so that each has its own colour.",
    "Show where every instance is, using different colours.",
    "Give each individual thing in the picture its own colour.",
    "Create an instance segmentation map in colour.",
    "Every instance gets a different colour; draw the map.",
    "Colour every separate object in a colour of its own.",
    "Produce instance masks, each filled with a different colour.",
    "Map each instance to a unique solid colour.",
    "Distinguish all objects by colouring them differently.",
    "Make a picture where each instance is one distinct colour.",
    "Break the image into instances, each shown in its own colour.",
    "Colourise every instance mask uniquely.",
    "Draw a segmentation where each object has a separate colour.",
    "Give all instances different flat colours.",
    "Show each object as a coloured mask, no colour used twice.",
    "Segment every object and colour it uniquely.",
    "Paint each mask a different colour.",
    "Produce a per-object colour segmentation.",
    "Fill in every instance with a colour unlike the others.",
    "Generate a colour map where each instance stands out in its own colour.",
    "Separate the instances by colour.",
    "Colour the instances, a new colour for each one.",
    "Draw all instances, each in a colour of its own.",
    "Create coloured masks for every object in view.",
)

RECONSTRUCTION = (
    "Reproduce this image exactly.",
    "Draw the same picture again.",
    "Recreate the image as faithfully as possible.",
    "Copy this image.",
    "Generate an identical version of this picture.",
    "Redraw the image without changing anything.",
    "Reconstruct the input image.",
    "Make an exact copy of this photo.",
    "Render this picture once more, unchanged.",
    "Output the same image you were given.",
    "Repaint the scene exactly as it is.",
    "Regenerate this image pixel for pixel.",
    "Produce a faithful reproduction of the image.",
    "Rebuild the picture with every detail kept.",
    "Recreate the photo with the same colours and layout.",
    "Duplicate the image.",
    "Return the image as it is.",
    "Draw this image again, keeping all details.",
    "Generate the same scene with nothing altered.",
    "Reconstruct the picture in full detail.",
    "Make the image again, identical to the original.",
    "Reproduce the scene exactly.",
    "Paint an exact replica of this picture.",
    "Give me back this same image.",
    "Recreate every object and colour of this image.",
    "Render a copy of the input.",
    "Rebuild this image from what you see.",
    "Produce the same picture, unchanged.",
    "Repeat this image exactly.",
    "Redraw the photograph faithfully.",
    "Generate a copy that matches the input image.",
    "Restore this image exactly as shown.",
    "Draw what you see, exactly as it appears.",
    "Make a precise reproduction of this image.",
    "Output a replica of the picture.",
    "Reconstruct this scene with the same layout and colours.",
    "Copy the picture, keeping its composition.",
    "Recreate this image one to one.",
    "Regenerate the input picture.",
    "Paint this scene again exactly.",
    "Reproduce the photo in every detail.",
    "Produce an image identical to this one.",
    "Recreate the given picture.",
    "Show the same image again.",
    "Render the input image faithfully.",
    "Draw an identical copy of the scene.",
    "Generate this exact picture.",
    "Rebuild the image exactly as it looks.",
    "Make a copy of the image with no changes.",
    "Reproduce what is shown, unchanged.",
    "Redraw this picture as it is.",
    "Reconstruct the image faithfully.",
    "Recreate this photograph.",
    "Give an exact reconstruction of this image.",
    "Copy every detail of this image into a new one.",
)

EDGE = (
    "Draw the edges of this image.",
    "Detect the edges and show them in white on black.",
    "Produce an edge map of the picture.",
    "Show only the outlines in this image.",
    "Trace every edge in the scene.",
    "Extract the edges of the image.",
    "Generate the edge detection result.",
    "Turn this photo into a line drawing of its edges.",
    "Mark all edges in white on a black background.",
    "Find the boundaries and draw them as lines.",
    "Render the contours of everything in the picture.",
    "Create an edge image from this picture.",
    "Show where the intensity changes sharply.",
    "Draw the outlines of all objects.",
    "Make an edge sketch of this scene.",
    "Convert the image into its edge map.",
    "Highlight every edge as a white line.",
    "Output the edges detected in this image.",
    "Sketch the contours of the image.",
    "Draw the borders between regions.",
    "Produce white edge lines on black.",
    "Show the image's edges only.",
    "Detect boundaries and draw them.",
    "Generate an outline drawing of the scene.",
    "Trace the object contours in white.",
    "Extract and draw all the edges.",
    "Give me the edge map of this photo.",
    "Render the edges of every shape.",
    "Make a map of all the edges.",
    "Draw the gradient edges of this image.",
    "Outline every object and region boundary.",
    "Keep only the edges and make the rest black.",
    "Compute the edges of this picture and draw them.",
    "Produce a contour map of the image.",
    "Show all outlines as bright lines on a dark background.",
    "Draw edge lines for this scene.",
    "Create the edge detection map.",
    "Trace all the boundaries in the image.",
    "Turn the picture into white edges on black.",
    "Reveal the edges in this image.",
    "Mark the outlines of the objects.",
    "Generate an edge-only version of the image.",
    "Convert the photo into an outline image.",
    "Draw every contour in the scene.",
    "Paint the edges white and everything else black.",
    "Detect all the edges in this picture.",
    "Show the boundaries of the shapes.",
    "Produce a line map of the edges.",
    "Make an image of the detected edges.",
    "Extract the outlines from this image.",
    "Sketch the edges of everything you see.",
    "Render an edge drawing of this photo.",
    "Find all edges and display them.",
    "Draw the object boundaries as thin lines.",
    "Output an edge image for this scene.",
)

INPAINTING = (
    "Remove the scribbles and restore the image.",
    "Fill in the damaged parts of the picture.",
    "Restore the image under the painted strokes.",
    "Inpaint the corrupted regions.",
    "Repair this damaged image.",
    "Erase the marks and recover the original picture.",
    "Reconstruct the hidden parts of the image.",
    "Fill the masked areas with plausible content.",
    "Clean up the strokes and rectangles covering the photo.",
    "Recover the original image behind the occlusions.",
    "Complete the missing regions of the picture.",
    "Remove the overlaid lines and fill in what is behind them.",
    "Restore the covered parts of this scene.",
    "Heal the damaged areas of the image.",
    "Paint over the defects so the image looks whole.",
    "Recover what the blocks are hiding.",
    "Inpaint this image.",
    "Fix the corrupted picture.",
    "Undo the scribbles on this photo.",
    "Fill in the blanks in this image.",
    "Restore the clean version of this picture.",
    "Remove the occluding shapes and complete the scene.",
    "Repair the image where it has been painted over.",
    "Reconstruct the image without the strokes.",
    "Recover the full image from this damaged one.",
    "Get rid of the marks and restore the content.",
    "Fill the holes in the picture.",
    "Clean this image by restoring the obscured parts.",
    "Complete the image where parts are blocked out.",
    "Restore the original scene.",
    "Remove the corruption from the photo.",
    "Erase the painted lines and fill the gaps.",
    "Make the image whole again.",
    "Recover the image under the white or black marks.",
    "Inpaint the missing content.",
    "Remove the rectangles and recover the picture.",
    "Restore every damaged pixel.",
    "Reconstruct the original, uncorrupted image.",
    "Fill in the regions that were covered.",
    "Produce the clean image without the masks.",
    "Repair the scratched picture.",
    "Undo the damage to this image.",
    "Recover the scene hidden by the strokes.",
    "Clean the image and fill the occluded areas.",
    "Restore the picture to its original state.",
    "Complete the partially hidden image.",
    "Remove all the overlaid marks.",
    "Fill the covered areas so they match the rest.",
    "Generate the image without the corruption.",
    "Reconstruct the scene behind the scribbles.",
    "Recover the original photograph.",
    "Patch up the damaged regions.",
    "Inpaint where the image is covered.",
    "Give me the restored, clean image.",
    "Remove the blotches and restore the details.",
)

TEMPLATES = {"seg": SEGMENTATION, "recon": RECONSTRUCTION, "edge": EDGE, "inpaint": INPAINTING}


def templates_for(task: str, lists: dict[str, tuple[str, ...]] = TEMPLATES) -> tuple[str, ...]:
    """The instructions of ``task`` in ``lists`` (default: the built-in templates; a run's: ``instruction_lists``)."""
    if task not in lists:
        raise ValueError(f"no instruction templates for task {task!r}; have {tuple(lists)}")
    return lists[task]


def load_instructions(path: str) -> tuple[str, ...]:
    """An instruction list file: a JSON array of strings, or text with one instruction per line (blank lines
    skipped). Errors name the file and what is wrong."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config.data.seg_instructions: {path!r} is not a file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(items, list) or not all(isinstance(t, str) for t in items):
            raise ValueError(f"{path}: must hold a JSON array of strings")
    else:
        items = text.splitlines()
    items = tuple(t.strip() for t in items if t.strip())
    if not items:
        raise ValueError(f"{path}: holds no instruction")
    return items


def instruction_lists(config) -> dict[str, tuple[str, ...]]:
    """The instruction list of every task for this run: the built-in templates, with the segmentation list
    replaced by the file ``config.data.seg_instructions`` names (if any)."""
    lists = dict(TEMPLATES)
    if config.data.seg_instructions:
        lists["seg"] = load_instructions(config.data.seg_instructions)
    return lists


def pick(task: str, key: str, seed: int = 0, epoch: int = 0) -> str:
    """The instruction of sample ``key`` for ``task``: uniform over the task's templates, seeded by
    (seed, epoch, key) so it is reproducible and changes from epoch to epoch."""
    t = templates_for(task)
    rng = np.random.default_rng([seed, epoch, key_seed(key, "template")])
    return t[int(rng.integers(len(t)))]


def all_words() -> list[str]:
    """Every lower-cased word (punctuation stripped) in all templates, for building a small tokenizer."""
    words = set()
    for ts in TEMPLATES.values():
        for t in ts:
            for w in t.lower().replace(",", " ").replace(".", " ").replace(";", " ").split():
                words.add(w)
    return sorted(words)
