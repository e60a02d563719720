"""POST /v1/edit: the code-space edits of `stage2_prior.edit` on uploaded images (multipart form).

inpaint: resample the masked region; transfer: resample part of the image under a target class;
mix: paste image_b's masked region into image and harmonise the seam; interpolate: frames from
image to image_b. The mask is a picture (white = edit) cropped like the image, or a box in pixels
of the served image size; a code position counts as masked when any of its pixels is.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

import torch
from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import JSONResponse, Response

from stage2_prior import edit
from stage2_prior.edit_images import box_pixel_mask, grid_mask
from vqgan.serve.images import b64, mask_tensor, png_bytes
from vqgan.serve.schemas import BUSY_RESPONSE, MAX_SEED, EditedImages, unprocessable

if TYPE_CHECKING:
    from vqgan.serve.app import Server

Operation = Literal["inpaint", "transfer", "mix", "interpolate"]
NEEDS_B = ("mix", "interpolate")
NEEDS_MASK = ("inpaint", "mix")


def add_edit_route(router: APIRouter, server: "Server") -> None:
    prior, tokenizer, device, R = server.prior, server.tokenizer, server.device, server.resolution

    async def grid_from(mask: UploadFile | None, box: str | None) -> torch.Tensor | None:
        """mask picture or box -> code-position mask (h, w), True = edit; None when neither is given."""
        if mask is not None and box is not None:
            raise unprocessable("mask", "give mask or box, not both")
        if box is not None:
            try:
                pixels = box_pixel_mask([int(v) for v in box.split(",")], (R, R))
            except ValueError as e:
                raise unprocessable("box", str(e)) from None
        elif mask is not None:
            pixels = await server.image(mask, "mask", to_tensor=mask_tensor)
        else:
            return None
        return grid_mask(pixels, tokenizer.code_factor).to(device)

    @router.post("/edit", summary="edit images in code space (multipart form)", response_class=Response,
                 responses={200: {"content": {"image/png": {}, "application/json": {
                     "schema": EditedImages.model_json_schema()}},
                     "description": "one result: the PNG (seed in X-Seed); more: JSON of base64 PNGs"},
                     **BUSY_RESPONSE})
    async def edit_images(
        operation: Annotated[Operation, Form(description="inpaint | transfer | mix | interpolate")],
        image: Annotated[UploadFile, File(description="the image to edit (a, for mix and interpolate)")],
        image_b: Annotated[UploadFile | None, File(description="the second image: mix, interpolate")] = None,
        mask: Annotated[UploadFile | None, File(description="mask picture, white = edit (mix: the region "
                                                            "taken from image_b)")] = None,
        box: Annotated[str | None, Form(pattern=r"^\d{1,5},\d{1,5},\d{1,5},\d{1,5}$",
                                        description="x0,y0,x1,y1 in pixels of image_size (/v1/models), "
                                                    "instead of mask")] = None,
        class_: Annotated[str | None, Form(alias="class", description="class id or name: the target class "
                                                                      "(transfer, required) or the label")] = None,
        n: Annotated[int, Form(ge=1, le=64, description="results (not for interpolate)")] = 1,
        cfg: Annotated[float | None, Form(ge=0.0, le=50.0, description="guidance; default 3 for transfer, "
                                                                       "else 1")] = None,
        temperature: Annotated[float, Form(ge=0.0, le=10.0)] = 1.0,
        top_k: Annotated[int | None, Form(ge=1, le=1_000_000)] = None,
        top_p: Annotated[float | None, Form(gt=0.0, le=1.0)] = None,
        seed: Annotated[int, Form(ge=0, le=MAX_SEED)] = 0,
        resample_fraction: Annotated[float, Form(gt=0.0, lt=1.0, description="transfer without a mask")] = 0.5,
        order: Annotated[Literal["raster", "random", "center"], Form(description="transfer, interpolate")] = "raster",
        seam_rounds: Annotated[int | None, Form(ge=0, le=4, description="default 1 for mix, else 0")] = None,
        steps: Annotated[int, Form(ge=2, le=32, description="interpolate: frames including both ends")] = 8,
        decode_steps: Annotated[int | None, Form(ge=1, le=256, description="masked priors: decoding passes "
                                                                           "(default 8)")] = None,
        choice_temperature: Annotated[float | None, Form(ge=0.0, le=100.0, description="masked priors: "
                                                         "confidence noise (default 4.5)")] = None,
    ) -> Response:
        if n > server.max_n:
            raise unprocessable("n", f"n={n} exceeds this server's limit of {server.max_n} images per request")
        if operation in NEEDS_B and image_b is None:
            raise unprocessable("image_b", f"{operation} needs a second image, image_b")
        label = server.resolve_class(class_)
        if operation == "transfer" and label is None:
            raise unprocessable("class", "transfer needs the target class")
        region = await grid_from(mask, box)
        if operation in NEEDS_MASK and region is None:
            raise unprocessable("mask", f"{operation} needs a mask picture or a box: the region to "
                                        f"{'regenerate' if operation == 'inpaint' else 'take from image_b'}")
        pictures = [await server.image(image, "image")]
        if operation in NEEDS_B:
            pictures.append(await server.image(image_b, "image_b"))
        options = dict(cfg_scale=cfg if cfg is not None else (3.0 if operation == "transfer" else 1.0),
                       temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        decoding = {"decode_steps": decode_steps, "choice_temperature": choice_temperature}
        if prior.prior_type == "masked":
            options.update(steps=decode_steps, choice_temperature=choice_temperature)
        elif any(v is not None for v in decoding.values()):
            name = next(k for k, v in decoding.items() if v is not None)
            raise unprocessable(name, f"{name} applies to masked priors; this prior is autoregressive")

        def work() -> list[bytes]:  # on the model worker
            codes = tokenizer.encode(torch.stack(pictures).to(device))     # (1 or 2, h, w[, D])
            a = codes[:1].repeat_interleave(n, 0)
            labels = None if label is None else torch.full((n,), label, dtype=torch.long, device=device)
            if operation == "interpolate":
                result = edit.interpolate(codes[:1], codes[1:], steps, order=order, seed=seed)[:, 0]
            elif operation == "inpaint":
                result = edit.resample(prior, a, region, labels=labels, seam_rounds=seam_rounds or 0, **options)
            elif operation == "transfer":
                result = edit.class_transfer(prior, a, labels, resample_fraction=resample_fraction, mask=region,
                                             order=order, seam_rounds=seam_rounds or 0, **options)
            else:
                result = edit.mix(a, codes[1:].repeat_interleave(n, 0), region, prior=prior, labels=labels,
                                  seam_rounds=1 if seam_rounds is None else seam_rounds, **options)
            # one image per decode call: the bytes do not depend on how many results were asked for
            return [png_bytes(tokenizer.decode(result[i:i + 1])[0]) for i in range(result.shape[0])]

        pngs = await server.run(work)
        if len(pngs) == 1:
            return Response(pngs[0], media_type="image/png", headers={"X-Seed": str(seed)})
        return JSONResponse(EditedImages(operation=operation, seed=seed, images=[b64(p) for p in pngs]).model_dump())
