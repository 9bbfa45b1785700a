import { describeOrdersService } from '../../shared/test/orders-service-suite.ts'

describeOrdersService('express-app', {
  metrics: false,
  banner: /orders service \(express\) listening on (http:\/\/\S+)/,
})
