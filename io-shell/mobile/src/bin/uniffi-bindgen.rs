//! `uniffi-bindgen`: writes the foreign-language bindings of a built
//! `libquicproquo_mobile` (`generate --library PATH --language kotlin|swift|python --out-dir DIR`).

fn main() {
    uniffi::uniffi_bindgen_main()
}
