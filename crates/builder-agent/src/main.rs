fn main() {
    std::process::exit(builder_agent::cli::main());
}
