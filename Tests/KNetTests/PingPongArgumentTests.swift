#if canImport(Glibc)
import Glibc
#endif
import Dispatch
import Foundation
import KNet
import Testing

/// The knet-pingpong executable SwiftPM built beside this test bundle.
private let pingpongURL = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
    .appendingPathComponent("knet-pingpong")

/// Runs knet-pingpong with `arguments` (bounded: killed after `timeout` seconds); returns
/// its exit status (128 + signal when a signal ended it, -1 when it had to be killed) and
/// stderr.
private func runPingPong(_ arguments: [String], timeout: Double = 20) throws -> (status: Int32, stderr: String) {
    let process = Process()
    process.executableURL = pingpongURL
    process.arguments = arguments
    process.environment = ["KNET_LOOP_THREADS": "1"]
    let errors = Pipe()
    process.standardError = errors
    process.standardOutput = FileHandle.nullDevice
    let ended = DispatchSemaphore(value: 0)
    process.terminationHandler = { _ in ended.signal() }
    try process.run()
    // stderr is read on another thread: it stays open as long as the process runs.
    let text = Locked("")
    let read = DispatchSemaphore(value: 0)
    DispatchQueue.global().async {
        let data = errors.fileHandleForReading.readDataToEndOfFile()
        text.withLock { $0 = String(decoding: data, as: UTF8.self) }
        read.signal()
    }
    if ended.wait(timeout: .now() + timeout) == .timedOut {
        kill(process.processIdentifier, SIGKILL) // SIGTERM may be blocked: the mask is inherited
        ended.wait()
        read.wait()
        return (-1, text.withLock { $0 })
    }
    read.wait()
    let status = process.terminationReason == .uncaughtSignal ? 128 + process.terminationStatus
                                                              : process.terminationStatus
    return (status, text.withLock { $0 })
}

extension KNetTests {
    @Test("knet-pingpong: a bad argument is one clear line on stderr and exit status 2, never a trap or a hang",
          .timeLimit(.minutes(5)))
    func pingpongBadArguments() throws {
        guard FileManager.default.isExecutableFile(atPath: pingpongURL.path) else {
            Issue.record("knet-pingpong not built at \(pingpongURL.path) (swift build --build-tests builds it)")
            return
        }
        // A listening server: its port is in use, and a client run against it would start.
        let server = try ServerHarness(handler: nil, codec: nil)
        let port = "\(server.port)"
        let cases: [[String]] = [
            ["server"], ["server", "abc", "1"], ["server", "-1", "1"], ["server", "70000", "1"],
            ["server", port, "1"],                      // port in use
            ["server", "0", "0"],                       // 0 threads (the C knet_pingpong refuses it too)
            ["server", "0", "99999999999"],             // was a trap in setLoopThreads
            ["client", port, "1", "1", "-5", "1"], ["client", port, "1", "1", "1"],
            ["client", port, "1", "1", "inf", "1"],     // was a run that never ends
            ["client", port, "0", "1", "1", "1"], ["client", port, "1", "1", "1", "2000"],
            ["--conns", "1e300"], ["--threads", "99999999999"], // were traps (Double to Int)
            ["--seconds", "0"], ["--seconds"], ["bogus"],
        ]
        for arguments in cases {
            let (status, stderr) = try runPingPong(arguments)
            let lines = stderr.split(separator: "\n")
            #expect(status == 2, "\(arguments): exit status \(status), stderr: \(stderr)")
            #expect(lines.count == 1 && lines[0].hasPrefix("knet-pingpong: "),
                    "\(arguments): stderr should be one knet-pingpong line: \(stderr)")
        }
        #expect(server.stop() == .serverClosed)
    }
}
