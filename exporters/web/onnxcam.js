// Explains an image in the browser with the in-graph heatmaps file (onnxcam export --web): preprocesses as
// onnxcam's Python does (OpenCV's area resize when shrinking, else bilinear; /255, mean, std), runs one session
// (WebGPU where the browser has it, else WebAssembly) and draws the heatmap over the image. window.onnxcam holds
// the last result, for tests.
import * as ort from "onnxruntime-web";

const config = await (await fetch("onnxcam.json")).json();
const $ = (id) => document.getElementById(id);
const TOP = 5;
const ARRAYS = { float32: Float32Array, float64: Float64Array, uint8: Uint8Array };
const state = (window.onnxcam = { config, result: null });

async function session() {
  const wasm = new URL(config.wasm, import.meta.resolve("onnxruntime-web"));
  ort.env.wasm.wasmBinary = await (await fetch(wasm, { integrity: config.wasm_integrity })).arrayBuffer();
  for (const provider of ["webgpu", "wasm"]) {
    try {
      const created = await ort.InferenceSession.create(config.model, { executionProviders: [provider] });
      return Object.assign(created, { provider });
    } catch (error) {
      if (provider === "wasm") throw error;
    }
  }
}

// (source index, weight) pairs per output index along one axis, as cv2.resize: INTER_AREA's overlaps when
// shrinking, INTER_LINEAR's half-pixel taps (clamped at the edges) otherwise
function taps(source, target, shrinking) {
  const scale = source / target;
  return Array.from({ length: target }, (_, i) => {
    if (shrinking) {
      const start = i * scale, end = start + scale, pairs = [];
      for (let s = Math.floor(start); s < Math.min(Math.ceil(end), source); s++) {
        pairs.push([s, (Math.min(end, s + 1) - Math.max(start, s)) / scale]);
      }
      return pairs;
    }
    const x = (i + 0.5) * scale - 0.5, left = Math.floor(x), f = x - left;
    if (left < 0) return [[0, 1]];
    if (left >= source - 1) return [[source - 1, 1]];
    return [[left, 1 - f], [left + 1, f]];
  });
}

// RGBA pixels (width x height) -> RGB at the model's size, rounded to 8 bits as OpenCV's uint8 resize
function resize(rgba, width, height) {
  const [outHeight, outWidth] = config.size;
  const shrinking = height > outHeight || width > outWidth;
  const across = taps(width, outWidth, shrinking), down = taps(height, outHeight, shrinking);
  const rows = new Float64Array(height * outWidth * 3);
  for (let y = 0; y < height; y++) {
    across.forEach((pairs, x) => {
      for (let c = 0; c < 3; c++) {
        rows[(y * outWidth + x) * 3 + c] = pairs.reduce((sum, [s, w]) => sum + w * rgba[(y * width + s) * 4 + c], 0);
      }
    });
  }
  const out = new Uint8Array(outHeight * outWidth * 3);
  down.forEach((pairs, y) => {
    for (let i = 0; i < outWidth * 3; i++) {
      out[y * outWidth * 3 + i] = Math.round(pairs.reduce((sum, [s, w]) => sum + w * rows[s * outWidth * 3 + i], 0));
    }
  });
  return out;
}

// the model's input tensor from resized RGB: float types scaled to [0, 1] then (x - mean) / std in float32 steps
function tensor(rgb) {
  const [height, width] = config.size;
  const data = new ARRAYS[config.type](rgb.length);
  const f = Math.fround;
  for (let p = 0; p < height * width; p++) {
    for (let c = 0; c < 3; c++) {
      let value = rgb[p * 3 + c];
      if (config.type !== "uint8") {
        value = f(value / 255);
        if (config.mean) value = f(value - f(config.mean[c]));
        if (config.std) value = f(value / f(config.std[c]));
      }
      data[config.layout === "nchw" ? c * height * width + p : p * 3 + c] = value;
    }
  }
  const dims = config.layout === "nchw" ? [1, 3, height, width] : [1, height, width, 3];
  return new ort.Tensor(config.type, data, dims);
}

function probabilities(scores) {
  if (config.squashing === "LogSoftmax") return scores.map(Math.exp);
  if (config.squashing) return scores;
  const top = Math.max(...scores), exps = scores.map((s) => Math.exp(s - top));
  const total = exps.reduce((a, b) => a + b, 0);
  return exps.map((e) => e / total);
}

// MATLAB's jet, as OpenCV's COLORMAP_JET draws it
function heatCanvas(heatmap) {
  const [height, width] = config.size;
  const canvas = new OffscreenCanvas(width, height);
  const pixels = new ImageData(width, height);
  const channel = (v, centre) => 255 * Math.min(1, Math.max(0, 1.5 - Math.abs(4 * v - centre)));
  heatmap.forEach((v, i) => pixels.data.set([channel(v, 3), channel(v, 2), channel(v, 1), 255], i * 4));
  canvas.getContext("2d").putImageData(pixels, 0, 0);
  return canvas;
}

function draw() {
  const { image, heat } = state.view;
  const canvas = $("overlay");
  const context = canvas.getContext("2d");
  [canvas.width, canvas.height] = [image.width, image.height];
  context.drawImage(image, 0, 0);
  context.globalAlpha = $("opacity").value / 100;
  context.drawImage(heat, 0, 0, image.width, image.height);
  context.globalAlpha = 1;
  canvas.dataset.drawn = "true";
}

async function explain(model, image, input, target = -1) {
  $("status").textContent = `explaining on ${model.provider}…`;
  const feeds = { [config.input]: input, [config.class_input]: new ort.Tensor("int64", BigInt64Array.of(BigInt(target)), [1]) };
  const out = await model.run(feeds, [config.scores, config.heatmaps, config.selected]);
  const scores = probabilities(Array.from(out[config.scores].data, Number));
  const top = scores.map((p, c) => [c, p]).sort((a, b) => b[1] - a[1]).slice(0, TOP);
  const heatmap = out[config.heatmaps].data;
  const selected = Number(out[config.selected].data[0]);
  state.result = { input: input.data, heatmap, selected, top, provider: model.provider };
  state.view = { image, heat: heatCanvas(heatmap) };
  draw();
  $("classes").replaceChildren(...top.map(([c, p]) => {
    const item = document.createElement("li");
    item.textContent = `${config.labels?.[c] ?? `class ${c}`}: ${(100 * p).toFixed(1)}%${c === selected ? " (explained)" : ""}`;
    item.title = "explain this class";
    item.onclick = () => explain(model, image, input, c);
    return item;
  }));
  const name = config.labels?.[selected] ?? `class ${selected}`;
  $("status").textContent = `${config.method} for ${name}, on ${model.provider}`;
}

async function explainFile(model, file) {
  const image = await createImageBitmap(file, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  const canvas = new OffscreenCanvas(image.width, image.height);
  const context = canvas.getContext("2d");
  context.drawImage(image, 0, 0);
  const rgba = context.getImageData(0, 0, image.width, image.height).data;
  await explain(model, image, tensor(resize(rgba, image.width, image.height)));
}

try {
  const model = await session();
  $("status").textContent = `ready (${model.provider}): choose or drop an image`;
  const run = (file) => file && explainFile(model, file).catch((error) => { $("status").textContent = `error: ${error.message}`; });
  $("file").onchange = () => run($("file").files[0]);
  const drop = $("drop");
  drop.ondragover = (event) => { event.preventDefault(); drop.classList.add("over"); };
  drop.ondragleave = () => drop.classList.remove("over");
  drop.ondrop = (event) => { event.preventDefault(); drop.classList.remove("over"); run(event.dataTransfer.files[0]); };
  $("opacity").oninput = () => state.view && draw();
  document.body.dataset.ready = model.provider;
} catch (error) {
  $("status").textContent = `error: ${error.message}`;
}
