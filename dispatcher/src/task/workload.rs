//! Workload detection: is a task machine learning (`ml`), computer vision (`cv`) or plain
//! CPU work (`cpu`)? The kind decides whether the pod gets a large `/dev/shm` (PyTorch
//! data loaders and OpenCV pipelines pass tensors through shared memory; the container
//! runtime's default of 64 MiB makes them crash with "bus error").
//!
//! Pure and deterministic: the same submission always gets the same kind. A declared kind
//! wins; `auto` looks at, in order, computer-vision markers in the image and command, then
//! ML markers, then the GPU request.

use crate::task::{WorkloadKind, WorkloadRequest};

/// Image or command words that mark computer vision (checked first: most CV images are
/// built on an ML framework image).
const CV_MARKERS: [&str; 12] = [
    "opencv",
    "cv2",
    "ultralytics",
    "yolo",
    "detectron",
    "mmdet",
    "mmdetection",
    "mmsegmentation",
    "segment-anything",
    "deepstream",
    "torchvision",
    "supervision",
];

/// Image or command words that mark machine learning.
const ML_MARKERS: [&str; 22] = [
    "pytorch",
    "torch",
    "torchrun",
    "tensorflow",
    "jax",
    "cuda",
    "cudnn",
    "tritonserver",
    "triton",
    "vllm",
    "sglang",
    "transformers",
    "huggingface",
    "deepspeed",
    "accelerate",
    "keras",
    "mxnet",
    "paddle",
    "onnxruntime",
    "tensorrt",
    "nemo",
    "nvcr.io/nvidia",
];

/// The words of `text`: split on everything that is not a letter, digit, '-' or '.', so
/// `pytorch/pytorch:2.4.0-cuda12.1` yields `pytorch`, `2.4.0-cuda12.1` and its parts.
fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '.'))
        .filter(|w| !w.is_empty())
        .flat_map(|w| {
            let lower = w.to_ascii_lowercase();
            let mut parts: Vec<String> = lower
                .split(['-', '.'])
                .filter(|p| !p.is_empty())
                .map(|p| p.trim_end_matches(|c: char| c.is_ascii_digit()).to_owned())
                .filter(|p| !p.is_empty())
                .collect();
            parts.push(lower);
            parts
        })
}

fn mentions(markers: &[&str], image: &str, command: &[String]) -> bool {
    let image_words: Vec<String> = words(image).collect();
    // Registry paths such as nvcr.io/nvidia are matched on the whole image reference.
    let image_lower = image.to_ascii_lowercase();
    markers.iter().any(|marker| {
        (marker.contains('/') && image_lower.contains(marker))
            || image_words.iter().any(|w| w == marker)
            || command
                .iter()
                .flat_map(|arg| words(arg).collect::<Vec<_>>())
                .any(|w| w == *marker)
    })
}

/// The kind of a task with `image` running `command` (command and args), asking for GPUs
/// when `wants_gpu`, declared as `requested`.
#[must_use]
pub fn detect(
    requested: WorkloadRequest,
    image: &str,
    command: &[String],
    wants_gpu: bool,
) -> WorkloadKind {
    match requested {
        WorkloadRequest::Ml => WorkloadKind::Ml,
        WorkloadRequest::Cv => WorkloadKind::Cv,
        WorkloadRequest::Cpu => WorkloadKind::Cpu,
        WorkloadRequest::Auto => {
            if mentions(&CV_MARKERS, image, command) {
                WorkloadKind::Cv
            } else if wants_gpu || mentions(&ML_MARKERS, image, command) {
                WorkloadKind::Ml
            } else {
                WorkloadKind::Cpu
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::detect;
    use crate::task::{WorkloadKind, WorkloadRequest};

    fn auto(image: &str, command: &[&str], gpu: bool) -> WorkloadKind {
        let command: Vec<String> = command.iter().map(|&s| s.to_owned()).collect();
        detect(WorkloadRequest::Auto, image, &command, gpu)
    }

    #[test]
    fn auto_detection_table() {
        use WorkloadKind::{Cpu, Cv, Ml};
        let table: [(&str, &[&str], bool, WorkloadKind); 14] = [
            (
                "pytorch/pytorch:2.4.0-cuda12.1-cudnn9-runtime",
                &["python", "train.py"],
                false,
                Ml,
            ),
            ("nvcr.io/nvidia/tritonserver:24.08-py3", &[], false, Ml),
            ("nvcr.io/nvidia/pytorch:24.08-py3", &[], false, Ml),
            ("tensorflow/tensorflow:2.17.0-gpu", &[], false, Ml),
            (
                "ghcr.io/acme/trainer:1",
                &["torchrun", "--nproc-per-node=8", "train.py"],
                false,
                Ml,
            ),
            ("vllm/vllm-openai:v0.6.0", &[], true, Ml),
            (
                "ultralytics/ultralytics:8.3.0",
                &["yolo", "train"],
                true,
                Cv,
            ),
            ("ghcr.io/acme/detectron2:latest", &[], true, Cv),
            ("python:3.12", &["python", "-c", "import cv2"], false, Cv),
            ("python:3.12", &["python", "-c", "print(1)"], false, Cpu),
            ("busybox", &["sh", "-c", "echo hi"], false, Cpu),
            ("busybox", &["sh", "-c", "echo hi"], true, Ml),
            // Words, not substrings: "torchlight" is not torch, "jaxon" is not jax.
            ("acme/torchlight:1", &["jaxon"], false, Cpu),
            ("registry.example.com/team/app:cuda12", &[], false, Ml),
        ];
        for (image, command, gpu, expected) in table {
            assert_eq!(
                auto(image, command, gpu),
                expected,
                "{image} {command:?} gpu={gpu}"
            );
        }
    }

    #[test]
    fn a_declared_kind_wins() {
        let command = vec!["python".to_owned()];
        assert_eq!(
            detect(WorkloadRequest::Cpu, "pytorch/pytorch", &command, true),
            WorkloadKind::Cpu
        );
        assert_eq!(
            detect(WorkloadRequest::Cv, "busybox", &command, false),
            WorkloadKind::Cv
        );
    }
}
