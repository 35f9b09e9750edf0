// The Swift layer's paths no other test drove: ByteReader's skipBytes, readableBytesView
// and readAll, ByteWriter's sequence write, the built-in codecs' own Swift read and write,
// sends of non-contiguous sequences, and the setters' "negative or nil = off" forms.
#if canImport(Glibc)
import Glibc
#endif
import Dispatch
import Foundation
import KNet
import Testing

/// Newline-terminated lines, found through `readableBytesView`; a line "!" skips a negative
/// count (a codec error). Writes the line through the sequence form of `writeBytes`: the
/// body as an `ArraySlice` (contiguous), the newline as a `Repeated` (not contiguous).
private struct LineCodec: Codec {
    var maxFrameSize: Int { 64 }

    func read(from reader: inout ByteReader) throws -> [UInt8] {
        guard let end = reader.readableBytesView.firstIndex(of: 10) else {
            try reader.skipBytes(reader.readableBytes + 1) // more than buffered: wait
            return []
        }
        let line = try reader.readBytes(end)
        if line == [UInt8(ascii: "!")] { try reader.skipBytes(-1) }
        try reader.skipBytes(1)
        return line
    }

    func write(to writer: inout ByteWriter, _ message: [UInt8]) throws {
        writer.writeBytes(message[...])
        writer.writeBytes(repeatElement(UInt8(10), count: 1))
    }
}

extension KNetTests {
    @Test("a Swift line codec (readableBytesView, skipBytes, sequence writes): lines split anyhow arrive whole; a negative skip closes with .codec")
    func lineCodecEdges() throws {
        let handler = RecordingHandler(echo: true)
        let server = try ServerHarness(handler: handler, codec: LineCodec())
        let peer = try PlainSocket(port: server.port)
        try peer.write(Array("hel".utf8))
        #expect(eventually { handler.only != nil })
        try peer.write(Array("lo\nwor".utf8))
        try peer.write(Array("ld\n\n".utf8))
        let echoed = Array("hello\nworld\n\n".utf8)
        #expect(try peer.read(exactly: echoed.count) == echoed)
        #expect(handler.only?.messages == [Array("hello".utf8), Array("world".utf8), []])

        try peer.write(Array("!\n".utf8))
        #expect(try peer.read() == [], "the codec error closed the connection")
        #expect(eventually { handler.only?.disconnects == 1 })
        #expect(handler.only?.reasonAtDisconnect == .error(.codec))
        #expect(server.stop() == .serverClosed)
    }

    @Test("DefaultCodec's own Swift read and write (readAll) echo a raw stream")
    func defaultCodecSwiftSide() throws {
        let handler = RecordingHandler(echo: true)
        let server = try ServerHarness(handler: handler, codec: SwiftOnly(DefaultCodec()))
        let peer = try PlainSocket(port: server.port)
        let bytes = pattern(5000)
        try peer.write(bytes)
        #expect(try peer.read(exactly: bytes.count) == bytes)
        #expect(handler.only?.bytes == bytes)
        #expect(server.stop() == .serverClosed)
    }

    @Test("LengthFieldCodec's Swift read and write with its default 4-byte big-endian prefix match the C codec, max frame included",
          arguments: [false, true])
    func lengthField4SwiftAgainstC(swiftOnServer: Bool) throws {
        let c = LengthFieldCodec(maxFrame: 100)
        let swift = SwiftOnly(LengthFieldCodec(maxFrame: 100))
        let serverHandler = RecordingHandler(echo: true)
        let server = try ServerHarness(handler: serverHandler, codec: swiftOnServer ? swift : c)
        let messages = [pattern(0), pattern(1), pattern(100, offset: 7), pattern(3)]
        let clientHandler = RecordingHandler(onConnect: { conn in
            for message in messages { try? conn.send(message) }
        })
        let client = ClientHarness(port: server.port, handler: clientHandler, codec: swiftOnServer ? c : swift)
        #expect(eventually { clientHandler.only?.messages.count == messages.count })
        #expect(clientHandler.only?.messages == messages)
        #expect(serverHandler.only?.messages == messages)
        let conn = try #require(clientHandler.only?.object)
        #expect(throws: KNetError.codec) { try conn.send(pattern(101)) }
        #expect(client.stop() == .clientClosed)
        #expect(server.stop() == .serverClosed)

        // A prefix announcing 101 bytes closes the Swift side with .codec at once.
        let handler = RecordingHandler()
        let lone = try ServerHarness(handler: handler, codec: swift)
        let peer = try PlainSocket(port: lone.port)
        try peer.write([0, 0, 0, 101])
        #expect(try peer.read() == [])
        #expect(eventually { handler.only?.disconnects == 1 })
        #expect(handler.only?.reasonAtDisconnect == .error(.codec))
        #expect(lone.stop() == .serverClosed)
    }

    @Test("a non-contiguous byte sequence is sent whole through the raw, a C and a Swift codec")
    func sendNonContiguousSequence() throws {
        let body = pattern(3000)
        let cases: [(codec: (any Codec)?, header: [UInt8])] = [
            (nil, []),
            (DefaultCodec(), []),
            (StdCodec(), [0x0B, 0xB8]),
            (HeaderBodyCodec(), [0, 0, 0x0B, 0xB8]),
        ]
        for (codec, header) in cases {
            let handler = RecordingHandler()
            let server = try ServerHarness(handler: handler, codec: codec)
            let peer = try PlainSocket(port: server.port)
            #expect(eventually { handler.only?.object != nil })
            let conn = try #require(handler.only?.object)
            try conn.send(body.lazy.map { $0 })
            #expect(try peer.read(exactly: header.count + body.count) == header + body)
            #expect(server.stop() == .serverClosed)
        }
    }

    @Test("setMaxQueuedBytes with a negative bound on a connection lifts the server's bound")
    func negativeAndNilSettersMeanUnlimited() throws {
        let handler = RecordingHandler()
        let server = TCPServer("127.0.0.1:0")
        server.setMaxQueuedBytes(1)
        let serving = Background { try server.listenAndServe(handler: handler) }
        let port = try server.waitUntilListening(timeout: .seconds(10))
        let peer = try PlainSocket(port: port) // never reads until the end
        #expect(eventually { handler.only?.object != nil })
        let conn = try #require(handler.only?.object)
        conn.setMaxQueuedBytes(-1)
        // Far more than the kernel's socket buffers take: only an unlimited queue holds it.
        let block = [UInt8](repeating: 7, count: 256 << 10)
        for _ in 0..<128 { try conn.send(block) }
        #expect(conn.closeReason == .open)
        // A deadline far beyond what the C API can say is clamped, not trapped on.
        conn.close(timeout: .seconds(Int64.max / 2))
        var received = 0
        try peer.readToEnd { received += $0.count }
        #expect(received == 128 * block.count)
        withExtendedLifetime(peer) {}
        server.close()
        #expect(serving.join() as? KNetError == .serverClosed)
        #expect(handler.snapshot.contractFailures == 0)
    }
}

extension KNetTests {
    @Test("listenAndServe and dialAndServe called from a callback (a loop thread) throw EDEADLK at once, and serving goes on")
    func serveCallsFromCallbackDeadlock() throws {
        let outcomes = Locked<[KNetError?]>([])
        let handler = RecordingHandler(echo: true, onConnect: { _ in
            var results: [KNetError?] = []
            do { try TCPServer("127.0.0.1:0").listenAndServe() } catch { results.append(error as? KNetError) }
            let client = TCPClient("127.0.0.1:1")
            do { try client.dialAndServe() } catch { results.append(error as? KNetError) }
            outcomes.withLock { $0 = results }
        })
        let server = try ServerHarness(handler: handler, codec: StdCodec())
        let peer = try PlainSocket(port: server.port)
        #expect(eventually { outcomes.withLock { $0.count } == 2 })
        #expect(outcomes.withLock { $0 } == [.system(errno: EDEADLK), .system(errno: EDEADLK)])
        try peer.write([0, 2, 7, 8])
        #expect(try peer.read(exactly: 4) == [0, 2, 7, 8])
        #expect(server.stop() == .serverClosed)
    }
}

extension KNetTests {
    @Test("setIdleTimeout(nil) after a timeout turns it off, on a server and on a client")
    func idleTimeoutNilTurnsItOff() throws {
        let handler = RecordingHandler()
        let server = TCPServer("127.0.0.1:0")
        server.setIdleTimeout(.milliseconds(30))
        server.setIdleTimeout(nil)
        let serving = Background { try server.listenAndServe(handler: handler) }
        let port = try server.waitUntilListening(timeout: .seconds(10))
        let clientHandler = RecordingHandler()
        let client = TCPClient("127.0.0.1:\(port)")
        client.setIdleTimeout(.milliseconds(30))
        client.setIdleTimeout(nil)
        let dialing = Background { try client.dialAndServe(handler: clientHandler) }
        #expect(eventually { handler.connectionCount == 1 && clientHandler.only != nil })
        // A control server with the 30 ms timeout, met twice after ours went quiet: by then
        // ours were idle well past any deadline the timeout would have set.
        let control = TCPServer("127.0.0.1:0")
        control.setIdleTimeout(.milliseconds(30))
        let controlServing = Background { try control.listenAndServe() }
        let controlPort = try control.waitUntilListening(timeout: .seconds(10))
        for round in 1...2 {
            let peer = try PlainSocket(port: controlPort)
            #expect(try peer.read() == [], "the control connection is closed as idle")
            #expect(eventually { control.stats.idleClosed == UInt64(round) })
        }
        #expect(clientHandler.connectionCount == 1 && clientHandler.only?.object?.closeReason == .open)
        #expect(server.stats.idleClosed == 0 && server.stats.live == 1)
        control.close()
        #expect(controlServing.join() as? KNetError == .serverClosed)
        client.close()
        #expect(dialing.join() as? KNetError == .clientClosed)
        server.close()
        #expect(serving.join() as? KNetError == .serverClosed)
        #expect(handler.snapshot.contractFailures == 0 && clientHandler.snapshot.contractFailures == 0)
    }
}

extension KNetTests {
    @Test("the documented programming errors trap: a length prefix of 3 bytes, a negative maxFrame, a negative loop count")
    func documentedTraps() async {
        await #expect(processExitsWith: .failure) { _ = LengthFieldCodec(lengthBytes: 3) }
        await #expect(processExitsWith: .failure) { _ = LengthFieldCodec(maxFrame: -1) }
        await #expect(processExitsWith: .failure) { try? setLoopThreads(-1) }
    }
}

extension KNetTests {
    @Test("a send in receive that writes at once to a peer that reset throws .system (EPIPE or ECONNRESET); the connection closes with it")
    func sendOnLoopToResetPeerThrowsSystem() throws {
        let entered = Locked(false)
        let outcome = Locked<KNetError??>(nil)
        let letGo = DispatchSemaphore(value: 0)
        let handler = RecordingHandler(onReceive: { conn, _ in
            entered.withLock { $0 = true }
            _ = letGo.wait(timeout: .now() + 10)
            do {
                try conn.send([1, 2, 3])
                outcome.withLock { $0 = .some(nil) }
            } catch {
                outcome.withLock { $0 = .some(error as? KNetError) }
            }
        })
        let server = try ServerHarness(handler: handler, codec: nil)
        var peer: PlainSocket? = try PlainSocket(port: server.port)
        try peer?.write([9])
        #expect(eventually { entered.withLock { $0 } })
        if let peer { resetOnClose(peer) }
        peer = nil // the RST is processed before close returns (loopback)
        letGo.signal()
        #expect(eventually { outcome.withLock { $0 != nil } })
        let reset: Set<KNetError> = [.system(errno: EPIPE), .system(errno: ECONNRESET)]
        let thrown = outcome.withLock { $0 } ?? nil
        #expect(thrown.map { reset.contains($0) } == true, "send threw \(String(describing: thrown))")
        #expect(eventually { handler.only?.disconnects == 1 })
        if case .error(let reason)? = handler.only?.reasonAtDisconnect {
            #expect(reset.contains(reason))
        } else {
            Issue.record("close reason \(String(describing: handler.only?.reasonAtDisconnect))")
        }
        #expect(server.stop() == .serverClosed)
    }
}

extension KNetTests {
    @Test("run() when no thread can be made throws .system(errno: EAGAIN) at once (no hang, the server untouched)",
          .disabled(if: underSanitizer, "a sanitizer's runtime needs address space the limit leaves no room for"))
    func runWithoutThreads() async {
        await #expect(processExitsWith: .success) {
            let server = TCPServer("127.0.0.1:0")
            // Address space for a few more small allocations, not for a thread's stack.
            let statm = try? String(contentsOfFile: "/proc/self/statm", encoding: .utf8)
            guard let pages = statm?.split(separator: " ").first.flatMap({ Int($0) }) else { exit(2) }
            var limit = rlimit()
            getrlimit(Int32(RLIMIT_AS.rawValue), &limit)
            let saved = limit
            limit.rlim_cur = rlim_t(pages * Int(getpagesize()) + (1 << 20))
            guard setrlimit(Int32(RLIMIT_AS.rawValue), &limit) == 0 else { exit(3) }
            var status: Int32 = 4
            do {
                try await server.run()
            } catch KNetError.system(errno: EAGAIN) {
                status = 0
            } catch {
                status = 5
            }
            var restore = saved
            setrlimit(Int32(RLIMIT_AS.rawValue), &restore)
            if status == 0 && server.port != 0 { status = 6 }
            exit(status)
        }
    }
}
