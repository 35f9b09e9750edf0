// swift-tools-version:6.0
import PackageDescription

// The C core (CKNet) is built from the same csrc/ and include/ that CMake uses: the target's
// path is the package root (so that include/ can be its public headers), only csrc/ holds
// its sources, and the other top-level entries are excluded. Keep `exclude` in step with
// the top level: a listed path that does not exist makes SwiftPM warn.
let package = Package(
    name: "knet",
    // knet runs on Linux (the core uses epoll and eventfd); this floor only settles
    // availability checks for tools that read the manifest on a Mac.
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "KNet", targets: ["KNet"]),
        .executable(name: "knet-pingpong", targets: ["knet-pingpong"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
    ],
    targets: [
        .target(
            name: "CKNet",
            path: ".",
            exclude: [
                "Sources", "Tests", "Benchmarks", "examples", "cmake", "scripts", "fuzz", "docs",
                "CMakeLists.txt", "README.md",
            ],
            sources: ["csrc"],
            publicHeadersPath: "include",
            cSettings: [.define("_GNU_SOURCE")],
            linkerSettings: [.linkedLibrary("pthread")]
        ),
        .target(
            name: "KNet",
            dependencies: ["CKNet", .product(name: "Logging", package: "swift-log")],
            path: "Sources/KNet"
        ),
        .executableTarget(
            name: "knet-pingpong",
            dependencies: ["KNet"],
            path: "Sources/knet-pingpong"
        ),
        .testTarget(
            name: "KNetTests",
            dependencies: ["KNet"],
            path: "Tests/KNetTests"
        ),
    ],
    swiftLanguageModes: [.v6]
)
