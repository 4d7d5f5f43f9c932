//! Every profile's rendered prompt, checked against a golden file in
//! `tests/golden/PROFILE.txt` (the prompt as the model sees it, with `{text}`
//! where the screened prompt goes). Regenerate with `PROMPTGATE_BLESS=1`
//! after a deliberate change, and read the diff.
//!
//! Guard models are not available here, so their selection is tested on tiny
//! GGUF files holding only the metadata a real one has (`general.name`,
//! `general.basename`, `general.architecture`, `tokenizer.chat_template`),
//! written with ggml's own GGUF writer.

mod common;

use std::ffi::CString;
use std::path::{Path, PathBuf};

use promptgate::engine::profile::{self, Profile, TemplateSource, TEXT_SLOT};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// The whole prompt: prefix, `{text}`, suffix (which ends with the answer prefix).
fn rendered(profile: &Profile, template: &str) -> String {
    let (prefix, suffix) = profile::render_parts(profile, template).unwrap();
    format!("{prefix}{TEXT_SLOT}{suffix}")
}

fn check_golden(name: &str, got: &str) {
    let path = golden_dir().join(format!("{name}.txt"));
    if std::env::var_os("PROMPTGATE_BLESS").is_some() {
        std::fs::write(&path, got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run with PROMPTGATE_BLESS=1)", path.display()));
    assert_eq!(
        got,
        want,
        "{name}: the rendered prompt differs from {}",
        path.display()
    );
}

/// The template a profile renders with, for a model whose embedded template is `embedded`.
fn template_of(profile: &Profile, embedded: &str) -> String {
    match &profile.template {
        TemplateSource::Embedded => embedded.to_string(),
        TemplateSource::Builtin(name) => name.clone(),
    }
}

#[test]
fn every_builtin_profile_matches_its_golden_file() {
    // SmolLM2's profile uses the template embedded in its GGUF.
    let smol = profile::read_meta(&common::smollm2()).unwrap();
    assert!(smol.has_chat_template);
    for p in profile::all_builtin() {
        check_golden(
            &p.name,
            &rendered(&p, &template_of(&p, &smol.chat_template)),
        );
    }
}

/// Writes a GGUF holding only string metadata.
fn tiny_gguf(path: &Path, kv: &[(&str, &str)]) {
    // SAFETY: a fresh gguf context, filled with owned C strings and freed at the end.
    unsafe {
        let ctx = llama_cpp_sys_2::gguf_init_empty();
        assert!(!ctx.is_null());
        for (k, v) in kv {
            let (k, v) = (CString::new(*k).unwrap(), CString::new(*v).unwrap());
            llama_cpp_sys_2::gguf_set_val_str(ctx, k.as_ptr(), v.as_ptr());
        }
        let p = CString::new(path.to_str().unwrap()).unwrap();
        assert!(llama_cpp_sys_2::gguf_write_to_file(ctx, p.as_ptr(), true));
        llama_cpp_sys_2::gguf_free(ctx);
    }
}

/// A file named and described like each guard model is asked in its own
/// format: the profile picked from its metadata renders as its golden file.
#[test]
fn guard_models_are_asked_in_their_own_format() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "Qwen3Guard-Gen-0.6B-Q8_0.gguf",
            "qwen3",
            "Qwen3Guard Gen 0.6B",
            "Qwen3Guard-Gen",
            "{%- for message in messages %}<|im_start|>{{ message.role }}...Safety: Controversial",
            "qwen3guard",
        ),
        (
            "Llama-Guard-3-1B.Q4_K_M.gguf",
            "llama",
            "Llama Guard 3 1B",
            "Llama-Guard-3",
            "{{ bos_token }}<|start_header_id|>user<|end_header_id|>\n\nTask: ... <BEGIN UNSAFE CONTENT CATEGORIES>",
            "llama-guard-3",
        ),
        (
            "narasimha-b-0.6b.Q8_0.gguf",
            "qwen3",
            "Narasimha B 0.6B",
            "narasimha-b",
            "<|im_start|>{{ message.role }} <think>",
            "narasimha",
        ),
        (
            "granite-guardian-3.2-5b.Q4_K_M.gguf",
            "granite",
            "Granite Guardian 3.2 5b",
            "granite-guardian-3.2",
            "<|start_of_role|>{{ guardian_config }}",
            "granite-guardian",
        ),
        (
            "granite-guardian-3.3-8b.Q4_K_M.gguf",
            "granite",
            "Granite Guardian 3.3 8b",
            "granite-guardian-3.3",
            "<|start_of_role|>",
            "granite-guardian-3.3",
        ),
    ];
    for (file, arch, name, basename, template, want) in cases {
        let path = dir.path().join(file);
        tiny_gguf(
            &path,
            &[
                ("general.architecture", arch),
                ("general.name", name),
                ("general.basename", basename),
                ("tokenizer.chat_template", template),
            ],
        );
        let meta = profile::read_meta(&path).unwrap();
        let p = profile::for_model(&path, &meta).unwrap();
        assert_eq!(p.name, want, "{file}");
        check_golden(want, &rendered(&p, &template_of(&p, template)));
    }
}

/// A generic model is recognised as a guard only by its metadata, not by a
/// word in its name alone; and the file name is enough when the metadata is empty.
#[test]
fn metadata_alone_or_file_name_alone_selects() {
    let dir = tempfile::tempdir().unwrap();
    let by_template = dir.path().join("my-model.gguf");
    tiny_gguf(
        &by_template,
        &[
            ("general.architecture", "llama"),
            (
                "tokenizer.chat_template",
                "<|start_header_id|> <BEGIN UNSAFE CONTENT CATEGORIES>",
            ),
        ],
    );
    let m = profile::read_meta(&by_template).unwrap();
    assert_eq!(
        profile::for_model(&by_template, &m).unwrap().name,
        "llama-guard-3"
    );
    let by_file = dir.path().join("Qwen3Guard-Gen-4B.gguf");
    tiny_gguf(&by_file, &[("general.architecture", "qwen3")]);
    let m = profile::read_meta(&by_file).unwrap();
    assert_eq!(profile::for_model(&by_file, &m).unwrap().name, "qwen3guard");
    let plain = dir.path().join("Qwen3-0.6B.gguf");
    tiny_gguf(
        &plain,
        &[
            ("general.architecture", "qwen3"),
            ("general.name", "Qwen3 0.6B"),
        ],
    );
    let m = profile::read_meta(&plain).unwrap();
    assert_eq!(
        profile::for_model(&plain, &m).unwrap().name,
        "generic-zero-shot"
    );
}

/// `NAME.profile.toml` next to `NAME.gguf` chooses the profile explicitly.
#[test]
fn a_profile_file_next_to_the_model_wins() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("renamed-guard.gguf");
    tiny_gguf(&path, &[("general.architecture", "qwen3")]);
    std::fs::write(
        dir.path().join("renamed-guard.profile.toml"),
        "profile = \"qwen3guard\"\ncontroversial = \"loose\"\n",
    )
    .unwrap();
    let meta = profile::read_meta(&path).unwrap();
    let p = profile::for_model(&path, &meta).unwrap();
    assert_eq!(p.name, "qwen3guard");
    assert!(p.benign_labels.iter().any(|l| l.contains("Controversial")));
    // The prompt is the same as the strict one's: only the labels differ.
    check_golden("qwen3guard", &rendered(&p, "chatml"));
    // A broken profile file refuses the model with a reason.
    std::fs::write(
        dir.path().join("renamed-guard.profile.toml"),
        "profile = 3\n",
    )
    .unwrap();
    let err = profile::for_model(&path, &meta).unwrap_err();
    assert!(err.contains("renamed-guard.profile.toml"), "{err}");
}
