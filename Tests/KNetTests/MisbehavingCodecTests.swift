// Swift codecs that misbehave, handlers that close inside callbacks, and TCPConnection
// accessors racing teardown (run these under --sanitize=thread as well).
#if canImport(Glibc)
import Glibc
#endif
import Foundation
import KNet
import Testing

/// Frames: [command, length, body...]. Command 0 is a good frame; the others misbehave.
/// Writes: the message's first byte picks a misbehaviour; otherwise [0, count, bytes].
struct ChaosCodec: Codec {
    struct Custom: Error {}
    static let enormous = 4 << 20

    var maxFrameSize: Int { 300 }

    func read(from reader: inout ByteReader) throws -> [UInt8] {
        let command = try reader.peekInteger(as: UInt8.self)
        switch command {
        case 1: return [1, 2, 3]                          // a message, nothing consumed
        case 2:
            try reader.skipBytes(1)
            throw Custom()                                // a failing decode
        case 3:
            try reader.skipBytes(2)
            return [UInt8](repeating: 3, count: Self.enormous) // far more than it consumed
        case 4:
            try reader.skipBytes(1)
            return try reader.readBytes(-1)               // a negative count
        case 5:
            try reader.skipBytes(1)
            return try reader.readBytes(1 << 30)          // waits beyond maxFrameSize
        default:
            try reader.skipBytes(1)
            let length = try reader.readInteger(as: UInt8.self)
            return try reader.readBytes(Int(length))
        }
    }

    func write(to writer: inout ByteWriter, _ message: [UInt8]) throws {
        switch message.first {
        case 0xF1: throw Custom()
        case 0xF2: return                                 // nothing at all
        case 0xF3:
            writer.writeBytes([UInt8](repeating: 0xF3, count: 100_000))
            throw KNetError.pendingSendFull               // after writing plenty
        default:
            writer.writeInteger(UInt8(0))
            writer.writeInteger(UInt8(message.count))
            writer.writeBytes(message)
        }
    }
}

extension KNetTests {
    @Test("misbehaving Swift codec reads close only their connection with .codec; others keep echoing",
          arguments: [UInt8(1), 2, 4, 5])
    func chaosCodecRead(command: UInt8) throws {
        let handler = RecordingHandler(echo: true)
        let server = try ServerHarness(handler: handler, codec: ChaosCodec())
        let good = try PlainSocket(port: server.port)
        #expect(eventually { handler.connectionCount == 1 })
        let bad = try PlainSocket(port: server.port)
        #expect(eventually { handler.connectionCount == 2 })
        try bad.write([0, 2, 7, 8])                       // one good frame first
        #expect(try bad.read(exactly: 4) == [0, 2, 7, 8])
        var input: [UInt8] = [command, 0]
        if command == 5 { input += [UInt8](repeating: 5, count: 1000) } // beyond maxFrameSize
        try bad.write(input)
        try? bad.write([0, 1, 9])                         // must not be delivered
        #expect(((try? bad.read()) ?? []) == [], "the bad connection is closed (EOF or reset)")
        try good.write([0, 3, 1, 2, 3])
        #expect(try good.read(exactly: 5) == [0, 3, 1, 2, 3], "the other connection still echoes")
        #expect(eventually { handler.snapshot.connections[1]?.disconnects == 1 })
        let record = handler.snapshot.connections[1]
        #expect(record?.reasonAtDisconnect == .error(.codec))
        #expect(record?.messages == [[7, 8]])
        #expect(handler.snapshot.connections[0]?.disconnects == 0)
        #expect(server.stop() == .serverClosed)
    }

    @Test("a Swift codec may return a message far larger than what it consumed")
    func chaosCodecEnormousMessage() throws {
        let sizes = Locked<[Int]>([])
        let handler = RecordingHandler(keepObjects: true, onReceive: { _, buf in
            sizes.withLock { $0.append(buf.count) }
        })
        let server = try ServerHarness(handler: handler, codec: ChaosCodec())
        let peer = try PlainSocket(port: server.port)
        #expect(eventually { handler.connectionCount == 1 })
        try peer.write([3, 0, 0, 1, 42, 3, 0])
        #expect(eventually { sizes.withLock { $0.count } == 3 })
        #expect(sizes.withLock { $0 } == [ChaosCodec.enormous, 1, ChaosCodec.enormous])
        #expect(handler.only?.object?.closeReason == .open)
        #expect(server.stop() == .serverClosed)
    }

    @Test("misbehaving Swift codec writes fail only that send, on and off the loop; nothing half-made is sent")
    func chaosCodecWrite() throws {
        let loopResults = Locked<[String]>([])
        let handler = RecordingHandler(onReceive: { conn, buf in
            // On the loop thread: the same misbehaviours.
            var results: [String] = []
            for first: UInt8 in [0xF1, 0xF2, 0xF3, 0x11] {
                do { try conn.send([first]); results.append("ok") } catch { results.append("\(error)") }
            }
            loopResults.withLock { $0 = results }
        })
        let server = try ServerHarness(handler: handler, codec: ChaosCodec())
        let peer = try PlainSocket(port: server.port)
        #expect(eventually { handler.only?.object != nil })
        let conn = try #require(handler.only?.object)
        #expect(throws: KNetError.codec) { try conn.send([0xF1]) }
        try conn.send([0xF2])                             // empty output: accepted, nothing sent
        #expect(throws: KNetError.pendingSendFull) { try conn.send([0xF3]) }
        try conn.send([0x10, 0x20])
        #expect(try peer.read(exactly: 4) == [0, 2, 0x10, 0x20])
        try peer.write([0, 0])
        #expect(eventually { loopResults.withLock { $0.count } == 4 })
        #expect(loopResults.withLock { $0 } == ["\(KNetError.codec)", "ok", "\(KNetError.pendingSendFull)", "ok"])
        #expect(try peer.read(exactly: 3) == [0, 1, 0x11])
        #expect(conn.closeReason == .open)
        #expect(server.stop() == .serverClosed)
    }

    @Test("close inside receive: later frames of the same read are dropped, connect(false) follows once on the loop thread")
    func closeInsideReceiveDropsRest() throws {
        let handler = RecordingHandler(onReceive: { conn, buf in
            if buf == [2] { conn.close() }
        })
        let server = try ServerHarness(handler: handler, codec: StdCodec())
        let peer = try PlainSocket(port: server.port)
        #expect(eventually { handler.connectionCount == 1 })
        try peer.write([0, 1, 1, 0, 1, 2, 0, 1, 3, 0, 1, 4])
        #expect(try peer.read() == [])
        #expect(eventually { handler.only?.disconnects == 1 })
        #expect(handler.only?.messages == [[1], [2]])
        #expect(handler.only?.reasonAtDisconnect == .local)
        #expect(server.stop() == .serverClosed)
    }

    @Test("shutdown inside receive: later frames still arrive, answers go out, then connect(false) once")
    func shutdownInsideReceiveKeepsDelivering() throws {
        let handler = RecordingHandler(onReceive: { conn, buf in
            if buf == [2] { conn.shutdown() }
            try? conn.send(buf)                           // fails with .connectionClosed after the shutdown
        })
        let server = try ServerHarness(handler: handler, codec: StdCodec())
        let peer = try PlainSocket(port: server.port)
        #expect(eventually { handler.connectionCount == 1 })
        try peer.write([0, 1, 1, 0, 1, 2, 0, 1, 3])
        var echoed: [UInt8] = []
        try peer.readToEnd { echoed += $0 }
        #expect(echoed == [0, 1, 1])
        try peer.write([0, 1, 4])
        #expect(eventually { handler.only?.messages.count == 4 })
        peer.shutdownWrite()
        #expect(eventually { handler.only?.disconnects == 1 })
        #expect(handler.only?.messages == [[1], [2], [3], [4]])
        #expect(server.stop() == .serverClosed)
    }

    @Test("TCPConnection used from many threads while it closes: no crash, no race, callbacks balanced",
          arguments: [false, true])
    func accessorsRaceTeardown(graceful: Bool) throws {
        let rounds = 12
        let threads = 4
        let handler = RecordingHandler(echo: true)
        let server = try ServerHarness(handler: handler, codec: StdCodec())
        for round in 0..<rounds {
            var peer: PlainSocket? = try PlainSocket(port: server.port)
            #expect(eventually { handler.connectionCount == round + 1 })
            let conn = try #require(handler.snapshot.connections[round]?.object)
            let start = Locked(0)
            let workers = (0..<threads).map { thread in
                Background {
                    start.withLock { $0 += 1 }
                    while start.withLock({ $0 }) < threads { sched_yield() }
                    for i in 0..<200 {
                        _ = try? conn.send([UInt8(thread), UInt8(i & 0xff)])
                        _ = conn.localAddress
                        _ = conn.remoteAddress
                        _ = conn.closeReason
                        _ = try? conn.setNoDelay(i & 1 == 0)
                        conn.setPendingSend(i & 7)
                        conn.setMaxQueuedBytes(1 << 20)
                        if thread == 0 && i == 100 { graceful ? conn.shutdown() : conn.close() }
                        if thread == 1 && i == 150 { conn.close(timeout: .milliseconds(50)) }
                    }
                }
            }
            for worker in workers { #expect(worker.join() == nil) }
            peer = nil
            _ = peer
            #expect(eventually { handler.snapshot.connections[round]?.disconnects == 1 })
            #expect(conn.closeReason != .open)
            #expect(throws: KNetError.connectionClosed) { try conn.send([1]) }
            #expect(throws: KNetError.connectionClosed) { try conn.setNoDelay(true) }
            // Once connect(false) has returned (the recorder's id is dropped), userdata is not kept.
            #expect(eventually { conn.userdata == nil })
            conn.userdata = 5
            #expect(conn.userdata == nil)
        }
        #expect(server.stop() == .serverClosed)
    }
}

extension KNetTests {
    @Test("answers sent in receive before a close in receive reach the peer, then EOF", arguments: [false, true])
    func answersBeforeCloseInReceive(swiftCodec: Bool) throws {
        let handler = RecordingHandler(onReceive: { conn, buf in
            try? conn.send(buf + buf)
            if buf == [3] { conn.close() }
        })
        let codec: any Codec = swiftCodec ? SwiftOnly(StdCodec()) : StdCodec()
        let server = try ServerHarness(handler: handler, codec: codec)
        let peer = try PlainSocket(port: server.port)
        #expect(eventually { handler.connectionCount == 1 })
        try peer.write([0, 1, 1, 0, 1, 2, 0, 1, 3, 0, 1, 4])
        var echoed: [UInt8] = []
        try peer.readToEnd { echoed += $0 }
        #expect(echoed == [0, 2, 1, 1, 0, 2, 2, 2, 0, 2, 3, 3])
        #expect(eventually { handler.only?.disconnects == 1 })
        #expect(handler.only?.messages == [[1], [2], [3]])
        #expect(server.stop() == .serverClosed)
    }

    @Test("close or shutdown inside connect(true) with input already waiting: order kept, connect(false) once",
          arguments: [false, true])
    func closeInConnectWithInputWaiting(graceful: Bool) throws {
        let handler = RecordingHandler(onConnect: { conn in
            try? conn.send([9])
            graceful ? conn.shutdown() : conn.close()
        })
        let server = try ServerHarness(handler: handler, codec: SwiftOnly(StdCodec()))
        let peer = try PlainSocket(port: server.port)
        try peer.write([0, 1, 1, 0, 1, 2])
        var got: [UInt8] = []
        if graceful {
            try peer.readToEnd { got += $0 }
            #expect(got == [0, 1, 9])
        } else {
            // Closed with the input unread: the kernel answers with a reset.
            _ = try? peer.readToEnd { got += $0 }
        }
        peer.shutdownWrite()
        #expect(eventually { handler.only?.disconnects == 1 })
        // A graceful close keeps delivering what the peer sends; a close drops it.
        if !graceful { #expect(handler.only?.messages == []) }
        #expect(server.stop() == .serverClosed)
    }
}

/// Records the thread of every read and write (as pthread ids).
final class ThreadRecordingCodec: Codec {
    let reads = Locked<[UInt]>([])
    let writes = Locked<[UInt]>([])
    func read(from reader: inout ByteReader) throws -> [UInt8] {
        reads.withLock { $0.append(UInt(pthread_self())) }
        let length = try reader.readInteger(as: UInt8.self)
        return try reader.readBytes(Int(length))
    }
    func write(to writer: inout ByteWriter, _ message: [UInt8]) throws {
        writes.withLock { $0.append(UInt(pthread_self())) }
        writer.writeInteger(UInt8(message.count))
        writer.writeBytes(message)
    }
}

extension KNetTests {
    @Test("a Swift codec reads on the connection's loop thread and writes on the sending thread, server and client")
    func codecThreads() throws {
        let loopThreads = Locked<Set<UInt>>([])
        let serverCodec = ThreadRecordingCodec()
        let serverHandler = RecordingHandler(echo: true, onConnect: { _ in
            loopThreads.withLock { _ = $0.insert(UInt(pthread_self())) }
        })
        let server = try ServerHarness(handler: serverHandler, codec: serverCodec)
        let clientCodec = ThreadRecordingCodec()
        let clientHandler = RecordingHandler(onConnect: { _ in
            loopThreads.withLock { _ = $0.insert(UInt(pthread_self())) }
        })
        let client = ClientHarness(port: server.port, handler: clientHandler, codec: clientCodec)
        #expect(eventually { clientHandler.only?.object != nil && serverHandler.only?.object != nil })
        let conn = try #require(clientHandler.only?.object)
        for i in 0..<20 { try conn.send([UInt8](repeating: UInt8(i), count: i)) }
        #expect(eventually { clientHandler.totalMessages == 20 })
        let me = UInt(pthread_self())
        let serverThread = serverHandler.only.map { UInt($0.thread) }
        let clientThread = clientHandler.only.map { UInt($0.thread) }
        #expect(Set(serverCodec.reads.withLock { $0 }) == Set([serverThread].compactMap { $0 }))
        #expect(Set(serverCodec.writes.withLock { $0 }) == Set([serverThread].compactMap { $0 }), "echoes are sent in receive")
        #expect(Set(clientCodec.reads.withLock { $0 }) == Set([clientThread].compactMap { $0 }))
        #expect(Set(clientCodec.writes.withLock { $0 }) == [me])
        #expect(!loopThreads.withLock { $0.contains(me) })
        #expect(clientHandler.only?.messages == (0..<20).map { [UInt8](repeating: UInt8($0), count: $0) })
        #expect(client.stop() == .clientClosed)
        #expect(server.stop() == .serverClosed)
    }
}

/// A userdata value whose deinit uses its connection (sends, reads and sets userdata).
final class TouchyUserdata: Sendable {
    let conn: TCPConnection
    let freed: Locked<Int>
    init(_ conn: TCPConnection, freed: Locked<Int>) {
        self.conn = conn
        self.freed = freed
    }
    deinit {
        _ = try? conn.send([1])
        _ = conn.userdata
        conn.userdata = 7
        freed.withLock { $0 += 1 }
    }
}

extension KNetTests {
    @Test("Tasks racing a persistent client's connections: send, userdata with re-entrant deinit, close, shutdown")
    func tasksRaceClientConnections() async throws {
        let serverHandler = RecordingHandler(echo: true, keepObjects: false)
        let server = try ServerHarness(handler: serverHandler, codec: SwiftOnly(StdCodec()))
        // No RecordingHandler on the client: the tasks below own its connections' userdata.
        let client = ClientHarness(port: server.port, handler: nil, codec: SwiftOnly(StdCodec()))
        let made = Locked(0)
        let freed = Locked(0)
        for round in 0..<8 {
            #expect(eventually { client.client.connection.map { $0.closeReason == .open } ?? false })
            guard let conn = client.client.connection else { continue }
            await withTaskGroup(of: Void.self) { group in
                for task in 0..<6 {
                    group.addTask {
                        for i in 0..<150 {
                            switch (task, i) {
                            case (0, 100): round.isMultiple(of: 2) ? conn.close() : conn.shutdown()
                            case (1, 120): conn.close(timeout: .milliseconds(20))
                            default: break
                            }
                            _ = try? conn.send([UInt8(task), UInt8(truncatingIfNeeded: i)])
                            if i % 10 == 0 {
                                made.withLock { $0 += 1 }
                                conn.userdata = TouchyUserdata(conn, freed: freed)
                            }
                            _ = conn.userdata
                            _ = conn.closeReason
                            _ = conn.localAddress
                            _ = try? conn.setNoDelay(i & 1 == 0)
                            conn.setPendingSend(i % 5)
                            _ = client.client.connection
                        }
                    }
                }
            }
            // Close and shutdown end the connection; the client dials again at once.
            #expect(eventually { conn.closeReason != .open })
        }
        #expect(client.stop() == .clientClosed)
        #expect(server.stop() == .serverClosed)
        #expect(eventually { freed.withLock { $0 } == made.withLock { $0 } },
                "userdata values made \(made.withLock { $0 }), freed \(freed.withLock { $0 })")
    }
}

/// A reader kept from an earlier call (which the docs forbid): its consumed count can be
/// larger than what the current call was given.
nonisolated(unsafe) private var stashedReader: ByteReader?

/// [0xAA, n, n bytes]: a message, keeping the reader; [0xBB, ...]: claims the kept
/// reader's consumed count (more than it was given).
struct OverclaimingCodec: Codec {
    func read(from reader: inout ByteReader) throws -> [UInt8] {
        let command = try reader.readInteger(as: UInt8.self)
        if command == 0xBB, let stash = stashedReader {
            reader = stash
            return [0xBB]
        }
        let length = try reader.readInteger(as: UInt8.self)
        let body = try reader.readBytes(Int(length))
        var kept = reader
        try kept.skipBytes(0)
        // Pretend much more was read: the kept copy has consumed the whole frame and more.
        stashedReader = kept
        return body
    }
    func write(to writer: inout ByteWriter, _ message: [UInt8]) throws {
        writer.writeBytes(message)
    }
}

extension KNetTests {
    @Test("a Swift codec claiming more bytes than it was given closes that connection with .codec")
    func overclaimingSwiftCodec() throws {
        let handler = RecordingHandler()
        let server = try ServerHarness(handler: handler, codec: OverclaimingCodec())
        let peer = try PlainSocket(port: server.port)
        #expect(eventually { handler.connectionCount == 1 })
        try peer.write([0xAA, 200] + [UInt8](repeating: 5, count: 200))
        #expect(eventually { handler.totalMessages == 1 })
        try peer.write([0xBB])
        #expect(((try? peer.read()) ?? []) == [])
        #expect(eventually { handler.only?.disconnects == 1 })
        #expect(handler.only?.reasonAtDisconnect == .error(.codec))
        #expect(handler.only?.messages.count == 1)
        #expect(server.stop() == .serverClosed)
        stashedReader = nil
    }
}
